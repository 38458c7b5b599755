"""Which registered files make up a corpus, and text clean-up shared by the parsers."""

from __future__ import annotations

from forgetless.data.registry import FileLister, sources


def files_under(folder: str, suffix: str) -> FileLister:
    """Every registered file under ``folder`` ending in ``suffix``, in path order, for any split
    (the parser assigns records to splits)."""

    def files(split: str, subset: str | None) -> tuple[str, ...]:
        return tuple(
            sorted(p for p in sources() if p.startswith(f"{folder}/") and p.endswith(suffix))
        )

    return files


def same_files(*relpaths: str) -> FileLister:
    return lambda split, subset: relpaths


def tidy_lines(text: str) -> str:
    """Runs of whitespace collapsed within each line; blank lines dropped."""
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)
