"""The production loop: what the API predicted, on which features, and how it turned out.

`inference_log` lands every `/predict` in `bronze.predictions` from a bounded buffer.
"""
