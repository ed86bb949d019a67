"""`lakehouse report`: one self-contained HTML page of the lakehouse's figures.

`data` reads what the page shows (the same tables and files as `lakehouse status`),
`charts` draws each figure with matplotlib as inline SVG, and `page` assembles them with
plain HTML and CSS: no script, no network, nothing to install to read it.
"""
