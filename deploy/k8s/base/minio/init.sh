mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing local/lakehouse
policy="$(mktemp)"
cat > "$policy" <<'POLICY'
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::lakehouse"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                 "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
      "Resource": ["arn:aws:s3:::lakehouse/*"]
    }
  ]
}
POLICY
mc admin policy create local lakehouse-bucket "$policy"
mc admin user add local "$LAKEHOUSE_S3_ACCESS_KEY_ID" "$LAKEHOUSE_S3_SECRET_ACCESS_KEY"
# `attach` fails when the policy is attached already (a later `up`, same volume).
mc admin user info local "$LAKEHOUSE_S3_ACCESS_KEY_ID" | grep -q lakehouse-bucket ||
  mc admin policy attach local lakehouse-bucket --user "$LAKEHOUSE_S3_ACCESS_KEY_ID"
