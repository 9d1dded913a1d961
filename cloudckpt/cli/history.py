"""The whole run as ``log`` and ``plot`` show it: live versions and the pruned ones the
index remembers (:attr:`cloudckpt.versions.Index.pruned`), as a ``git log --graph``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from cloudckpt.cli.common import metrics_text
from cloudckpt.versions import Index, Version


def walk(index: Index, vid: str) -> Iterator[Version]:
    """``vid`` and its ancestors, newest first, through pruned ones too; an ancestor the
    index forgot, or a cycle (a hostile index), ends it."""
    rows = index.history()
    seen: set[str] = set()
    row = rows.get(vid)
    while row is not None and row.id not in seen:
        yield row
        seen.add(row.id)
        row = rows.get(row.parent) if row.parent else None


def newest_first(rows: Sequence[Version] | dict[str, Version]) -> list[Version]:
    values = rows.values() if isinstance(rows, dict) else rows
    return sorted(values, key=lambda v: (v.created, v.id), reverse=True)


@dataclass
class _Line:
    marks: str
    text: str
    pruned: Version | None = None  # the pruned version the line draws, if it draws one


def graph(
    versions: Sequence[Version], decorate: Callable[[str], str], pruned: set[str] | None = None
) -> list[str]:
    """``git log --graph``-style lines for versions, newest first. Versions in
    ``pruned`` are marked so, and a run of them in one column collapses to its newest
    and a line counting the rest."""
    pruned = pruned or set()
    known = {v.id for v in versions}
    columns: list[str] = []
    lines: list[_Line] = []
    for v in newest_first(versions):
        if v.id not in columns:
            columns.append(v.id)
        col = columns.index(v.id)
        marks = _marks(col, len(columns))
        step = f"step {v.step}" if v.step is not None else "no step"
        note = " (pruned)" if v.id in pruned else ""
        text = f"{v.id}{decorate(v.id)}{note} {step} {metrics_text(v)}".rstrip()
        lines.append(_Line(marks, text, v if v.id in pruned else None))
        parent = v.parent if v.parent in known else None
        if parent is None:
            columns.pop(col)
        elif parent in columns:  # a branch point: this column joins the parent's
            other = columns.index(parent)
            left, right = min(col, other), max(col, other)
            columns[left] = parent
            columns.pop(right)
            lines.append(_Line(" ".join(["|"] * min(right, MAX_DRAWN)) + "/", ""))
        else:
            columns[col] = parent
    return _collapsed(lines)


#: The most lines of descent drawn side by side; more (only a damaged or hostile index
#: has thousands) are drawn as one "…", so the output stays linear in the versions.
MAX_DRAWN = 16


def _marks(col: int, columns: int) -> str:
    shown = " ".join("*" if i == col else "|" for i in range(min(columns, MAX_DRAWN)))
    if columns <= MAX_DRAWN:
        return shown
    return f"{shown} … *" if col >= MAX_DRAWN else f"{shown} …"


def _collapsed(lines: list[_Line]) -> list[str]:
    out: list[str] = []
    run: list[Version] = []
    for i, line in enumerate(lines):
        previous = lines[i - 1] if i else None
        if (
            line.pruned is not None
            and run
            and previous is not None
            and previous.pruned is not None
            and previous.marks == line.marks
            and previous.pruned.branch == line.pruned.branch  # a fork point stays in view
        ):
            run.append(line.pruned)
            continue
        _close(out, run, lines[i - 1].marks if i else "")
        run = [line.pruned] if line.pruned is not None else []
        out.append(f"{line.marks}  {line.text}" if line.text else line.marks)
    _close(out, run, lines[-1].marks if lines else "")
    return out


def _close(out: list[str], run: list[Version], marks: str) -> None:
    """After a run's newest line: one line for the older pruned versions of the run."""
    older = run[1:]
    if older:
        steps = [v.step for v in older if v.step is not None]
        span = f", steps {min(steps)}-{max(steps)}" if steps else ""
        out.append(f"{marks.replace('*', ':')}  ... {len(older)} older pruned versions{span}")


def series(
    index: Index, metric: str, branches: Sequence[str] | None
) -> dict[str, list[tuple[int, float]]]:
    """Per branch, ``(step, value)`` of ``metric`` over the whole run, pruned versions
    included, each branch starting at the version it forked from."""
    rows = index.history()
    out: dict[str, list[tuple[int, float]]] = {}
    first: dict[str, Version] = {}
    for v in rows.values():  # oldest first
        if branches and v.branch not in branches:
            continue
        first.setdefault(v.branch, v)
        if metric in v.metrics and v.step is not None:
            out.setdefault(v.branch, []).append((v.step, v.metrics[metric]))
    for branch, v in first.items():
        fork = rows.get(v.parent) if v.parent else None
        if fork is None or fork.branch == branch or fork.step is None:
            continue
        if branch in out and metric in fork.metrics:
            out[branch].append((fork.step, fork.metrics[metric]))
    return {b: sorted(points) for b, points in out.items()}
