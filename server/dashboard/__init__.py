"""`dpfl dashboard`: a local, read-only web view of the run directories under one folder.

`runs` reads run and sweep directories into plain dicts; `app` serves them as pages that
follow a live run (Starlette, Jinja2 templates, Chart.js vendored under `static/`).
"""
