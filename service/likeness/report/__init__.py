"""Reports: the JSON document, the HTML page and its plots."""
