"""Write the numbers in the docs from the committed results files, or check that they agree.

    python scripts/render_docs.py            # rewrite every marked number in README.md and docs/**/*.md
    python scripts/render_docs.py --check    # change nothing; exit 1 and list each number that disagrees
    python scripts/render_docs.py --check README.md --root .   # only these files; JSON paths under --root

A number in a markdown file is marked with two HTML comments (invisible on GitHub), e.g.

    <!--r-src rr = docs/results/fmnist_full_rerun/results.json#finetune_top1-->
    <!--r-let gain = rr:100.pretrained.mean - rr:100.scratch.mean-->
    top-1 <!--r rr:100.pretrained.mean-->88.53<!--/r-->, gain <!--r gain #~+.2f-->+5.26<!--/r-->

- `r-src ALIAS = PATH[#KEY.PATH]`: a JSON file (path from the repository root), optionally a part of it;
  a `.jsonl` file is the list of its lines' records (`log:-1.loss`: the last record's loss);
- `r-let NAME = EXPR`: a named expression, for derived numbers (gains, totals, means);
- `r EXPR [#FORMAT]` ... `/r`: the text between the two comments is EXPR, formatted.

EXPR is arithmetic (+ - * / //, parentheses, numbers) over references `ALIAS:key.path`, names from
`r-let` and the functions sum, mean, min, max, len, abs. In a key path, a segment is a dict key or a
list index (negative from the end); quote a key holding other characters than letters, digits and `_` ('Ankle boot'); a
segment with `*` or `?` matches several keys (a list: `sum(wall:finetune_*_1pct_*)`). Put spaces
around a minus sign. Directives belong to the file they are in; they may appear anywhere in it.

FORMAT is a Python format spec (default `.2f`; `+.2f` signs gains, `,.0f` groups thousands), or
`hmin` (seconds as "2 h 11 min") or `mins` (seconds as "13 min 22 s"). A leading `~` writes a minus
sign as U+2212. Never use `|` in a comment inside a table row: it would split the cell.

Adding results needs no change here: commit the JSON, then add `r-src` and markers to the markdown.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!--r\s+(?P<expr>.*?)-->(?P<text>.*?)<!--/r-->")
DIRECTIVE = re.compile(r"<!--r-(?P<kind>src|let)\s+(?P<name>[A-Za-z_]\w*)\s*=\s*(?P<value>.*?)\s*-->")
SEGMENT = r"(?:'[^']*'|-?[\w*?]+)"
REFERENCE = re.compile(rf"(?P<alias>[A-Za-z_]\w*):(?P<path>{SEGMENT}(?:\.{SEGMENT})*)")
FUNCS = {"sum": sum, "min": min, "max": max, "len": len, "abs": abs,
         "mean": lambda xs: sum(xs) / len(xs)}


class DocError(Exception):
    """A marker or directive that cannot be evaluated: a user error, reported as file:line: message."""


@dataclass
class Number:
    file: Path
    line: int
    expr: str
    fmt: str
    found: str
    expected: str
    sources: str


def split_path(path: str) -> list[str]:
    return [s[1:-1] if s.startswith("'") else s for s in re.findall(SEGMENT, path)]


def walk(node, segments: list[str], where: str):
    """The value at `segments` under `node`; a wildcard segment gives a list of every match."""
    for i, seg in enumerate(segments):
        if any(c in seg for c in "*?"):
            items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
            hits = [v for k, v in items if fnmatch.fnmatchcase(str(k), seg)]
            if not hits:
                raise DocError(f"{where}: no key matches '{seg}'")
            rest = segments[i + 1:]
            return [walk(v, rest, where) for v in hits]
        if isinstance(node, dict) and seg in node:
            node = node[seg]
        elif isinstance(node, list) and seg.lstrip("-").isdigit() and -len(node) <= int(seg) < len(node):
            node = node[int(seg)]
        else:
            have = ", ".join(map(str, node)) if isinstance(node, dict) else f"a {type(node).__name__}"
            raise DocError(f"{where}: no key '{seg}' (there: {have[:200]})")
    return node


class Scope:
    """The `r-src` aliases and `r-let` names of one markdown file, evaluated against --root."""

    def __init__(self, text: str, root: Path, file: Path):
        self.root, self.file, self.json_cache = root, file, {}
        self.srcs: dict[str, tuple[Path, list[str]]] = {}
        self.lets: dict[str, str] = {}
        for m in DIRECTIVE.finditer(text):
            name, value = m["name"], m["value"]
            if m["kind"] == "src":
                path, _, key = value.partition("#")
                self.srcs[name] = (root / path.strip(), split_path(key.strip()) if key.strip() else [])
            else:
                self.lets[name] = value

    def load(self, alias: str):
        if alias not in self.srcs:
            raise DocError(f"unknown source '{alias}' (declare it: <!--r-src {alias} = docs/results/...json-->)")
        path, prefix = self.srcs[alias]
        if path not in self.json_cache:
            try:
                text = path.read_text()
                self.json_cache[path] = ([json.loads(line) for line in text.splitlines() if line.strip()]
                                         if path.suffix == ".jsonl" else json.loads(text))
            except (OSError, ValueError) as e:
                raise DocError(f"source '{alias}': cannot read {path}: {e}") from None
        return walk(self.json_cache[path], prefix, str(path))

    def source_of(self, expr: str) -> list[str]:
        """Where the references of `expr` (through its `r-let` names) point, for messages."""
        out = []
        for m in REFERENCE.finditer(expr):
            if m["alias"] in self.srcs:
                path, prefix = self.srcs[m["alias"]]
                rel = path.relative_to(self.root) if path.is_relative_to(self.root) else path
                out.append(f"{rel}#{'.'.join(prefix + split_path(m['path']))}")
        for name in re.findall(r"[A-Za-z_]\w*", REFERENCE.sub("", expr)):
            if name in self.lets:
                out += self.source_of(self.lets[name])
        return list(dict.fromkeys(out))

    def eval(self, expr: str, stack: tuple[str, ...] = ()):
        refs: dict[str, object] = {}

        def ref(m):
            key = f"_ref{len(refs)}"
            node = self.load(m["alias"])
            refs[key] = walk(node, split_path(m["path"]), self.source_of(m[0])[0])
            return key

        try:
            tree = ast.parse(REFERENCE.sub(ref, expr).strip(), mode="eval")
        except SyntaxError:
            raise DocError(f"cannot parse expression '{expr}'") from None
        return self._node(tree.body, refs, expr, stack)

    def _node(self, n, refs, expr, stack):
        ev = lambda x: self._node(x, refs, expr, stack)  # noqa: E731
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.Name):
            if n.id in refs:
                return refs[n.id]
            if n.id in self.lets:
                if n.id in stack:
                    raise DocError(f"r-let '{n.id}' refers to itself")
                return self.eval(self.lets[n.id], stack + (n.id,))
            raise DocError(f"unknown name '{n.id}' in '{expr}' (an r-let name, or ALIAS:key.path)")
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            v = ev(n.operand)
            return -v if isinstance(n.op, ast.USub) else v
        ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b}
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            return ops[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in FUNCS and not n.keywords:
            args = [ev(a) for a in n.args]
            return FUNCS[n.func.id](args[0] if len(args) == 1 else args)
        raise DocError(f"'{expr}': only + - * / //, numbers, references and {', '.join(FUNCS)} are allowed")


def fmt_value(value, spec: str) -> str:
    if isinstance(value, list) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise DocError(f"the value is {json.dumps(value)[:80]}, not a number (a wildcard needs sum/mean/...)")
    unicode_minus = spec.startswith("~")
    spec = spec.lstrip("~")
    if spec in ("hmin", "mins"):
        total = round(value) if spec == "mins" else round(value / 60)
        big, small = divmod(total, 60)
        out = f"{big} h {small} min" if spec == "hmin" else f"{big} min {small} s"
        out = out if big else out.split(" ", 2)[2]
    else:
        try:
            out = format(value, spec)
        except ValueError as e:
            raise DocError(f"format '{spec}': {e}") from None
    if re.fullmatch(r"-[0.,]+", out):
        out = out[1:]  # -0.00 reads as a sign error
    return out.replace("-", "\u2212") if unicode_minus else out


def numbers(file: Path, root: Path) -> tuple[str, list[Number]]:
    """Every marked number of `file`, with the text it has and the text its JSON gives."""
    text = file.read_text()
    scope = Scope(text, root, file)
    out = []
    for m in MARKER.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        expr, _, spec = m["expr"].partition(" #")
        try:
            expected = fmt_value(scope.eval(expr.strip()), spec.strip() or ".2f")
        except DocError as e:
            raise DocError(f"{file}:{line}: {e}") from None
        except (ArithmeticError, TypeError) as e:
            raise DocError(f"{file}:{line}: '{expr.strip()}': {type(e).__name__}: {e}") from None
        out.append(Number(file, line, expr.strip(), spec.strip(), m["text"], expected,
                          ", ".join(scope.source_of(expr)) or "(no JSON reference)"))
    return text, out


def render(text: str, nums: list[Number]) -> str:
    """`text` with each marker's number replaced by its expected value (`nums` in marker order)."""
    spans = [m.span("text") for m in MARKER.finditer(text)]
    for (start, end), n in reversed(list(zip(spans, nums))):
        text = text[:start] + n.expected + text[end:]
    return text


def default_files(root: Path) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").rglob("*.md"))] if p.is_file()]


def unmarked(files: list[Path], root: Path) -> int:
    """Print the decimal numbers outside markers and code blocks: what is typed, not rendered."""
    count = 0
    for file in files:
        text = re.sub(r"```.*?```", lambda m: "\n" * m[0].count("\n"), file.read_text(), flags=re.S)
        text = re.sub(r"<!--.*?-->", "", MARKER.sub("", text))
        text = re.sub(r"`[^`\n]*`", "", text)
        for i, line in enumerate(text.splitlines(), 1):
            found = re.findall(r"(?<![\w.])[+\u2212-]?\d+\.\d+(?![\w.])", line)
            if found:
                count += len(found)
                shown = file.relative_to(root) if file.is_relative_to(root) else file
                print(f"{shown}:{i}: {' '.join(found)}")
    print(f"{count} decimal numbers are typed, not rendered", file=sys.stderr)
    return 0


def run(files: list[Path], root: Path, check: bool) -> int:
    bad, total, marked = [], 0, 0
    for file in files:
        text, nums = numbers(file, root)
        total += len(nums)
        marked += bool(nums)
        wrong = [n for n in nums if n.found != n.expected]
        bad += wrong
        if wrong and not check:
            file.write_text(render(text, nums))
    for n in bad:
        shown = n.file.relative_to(root) if n.file.is_relative_to(root) else n.file
        change = f"expected {n.expected}, found {n.found}" if check else f"{n.found} -> {n.expected}"
        print(f"{shown}:{n.line}: {n.expr}{' #' + n.fmt if n.fmt else ''} [{n.sources}]: {change}")
    verb = "disagree" if check else "rewritten"
    print(f"{total} marked numbers in {marked} files; {len(bad)} {verb}", file=sys.stderr)
    return 1 if bad and check else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md and docs/**/*.md)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a number disagrees")
    p.add_argument("--root", type=Path, default=ROOT, help="where the JSON paths start (default: the repository)")
    p.add_argument("--unmarked", action="store_true",
                   help="list the decimal numbers outside markers and code blocks (typed, so not checked)")
    a = p.parse_args(argv)
    root = a.root.resolve()
    files = [f.resolve() for f in a.files] or default_files(root)
    for f in files:
        if not f.is_file():
            print(f"render_docs: error: {f}: no such file", file=sys.stderr)
            return 2
    try:
        return unmarked(files, root) if a.unmarked else run(files, root, a.check)
    except DocError as e:
        print(f"render_docs: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
