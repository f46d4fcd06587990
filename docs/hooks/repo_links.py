"""MkDocs hook: links from a docs page to files of the repository outside ``docs/``.

The pages link to the repository's own files (``../benchmarks/run.py``, ``../examples``) so that they
read well on GitHub. On the built site those files are not pages; MkDocs would report them as
missing (an error under ``--strict``). This hook rewrites only links whose target exists in the
repository outside ``docs_dir``: to ``{repo_url}/blob/main/<path>`` when ``repo_url`` is set in
``mkdocs.yml``, else to the link's text alone. Links to missing files are left untouched, so MkDocs
still reports them.
"""

import os
import re

_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")


def on_page_markdown(markdown, page, config, files):
    docs_dir = os.path.abspath(config["docs_dir"])
    root = os.path.dirname(os.path.abspath(config["config_file_path"]))
    page_dir = os.path.dirname(os.path.join(docs_dir, page.file.src_path))
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def rewrite(match):
        target = match.group("target")
        if "://" in target or target.startswith(("#", "/", "mailto:")):
            return match.group(0)
        path = os.path.normpath(os.path.join(page_dir, target.split("#", 1)[0]))
        inside_docs = os.path.commonpath([path, docs_dir]) == docs_dir
        inside_repo = os.path.commonpath([path, root]) == root
        if inside_docs or not inside_repo or not os.path.exists(path):
            return match.group(0)
        if repo_url:
            return f"[{match.group('text')}]({repo_url}/blob/main/{os.path.relpath(path, root)})"
        return match.group("text")

    return _LINK.sub(rewrite, markdown)
