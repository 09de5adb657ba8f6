"""`report.html`: the Markdown report as one self-contained page, `loss.png` inlined as a data URI.

page = render_html(markdown_text, run_dir / "loss.png", title="medray-demo")
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
th {{ background: #f4f4f4; }}
img {{ max-width: 100%; }}
code {{ background: #f4f4f4; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def render_html(markdown_text: str, plot: Path, title: str) -> str:
    """The report as one self-contained HTML page: the Markdown rendered, `loss.png` inlined as a data URI."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    encoded = base64.b64encode(plot.read_bytes()).decode("ascii")
    body = body.replace(f'src="{plot.name}"', f'src="data:image/png;base64,{encoded}"')
    return HTML_PAGE.format(title=html.escape(f"medray report: {title}"), body=body)
