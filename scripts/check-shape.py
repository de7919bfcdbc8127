#!/usr/bin/env python3
"""The shape of src/ that docs/design.md promises, checked (CI runs this through test-all.sh):

- no circle between the files of one folder (A uses B and B uses A, directly or around a
  ring), nor between folders (data flows api -> jobs -> image / convert / volume; telemetry
  and the leaf helpers beside all);
- no LVM name outside src/volume/ (the backend seam);
- at most MAX_LONG functions longer than LONG lines, each listed in ALLOWED_LONG with the
  protocol it spells out.

Prints what it found and exits 1 when a rule is broken. `--report` prints the figures only.
"""

import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
LONG = 80
MAX_LONG = 6
# Long functions that read best whole, each a protocol one can name.
ALLOWED_LONG = {
    "inspect_qcow2": "the qcow2 header checklist of image-safety.md, in order",
    "convert": "one qemu-img convert: spawn, progress, cancel, exit status",
    "receive": "one download part: request, body, retries, stall cut",
    "round": "one pass over a download's parts and its checkpoints",
    "format_event": "one JSON log line, field by field",
    "connection": "one connection's lifecycle: handshake, limits, serve, drain",
}
LVM_NAMES = re.compile(r"\b(LvmBackend|GoldenImages|ThinPool|start_thin_pool|volume::lvm)\b")
# Folders and the folders they may use (besides the leaves below).
LAYERS = {
    "api": {"jobs", "image", "volume", "config", "telemetry"},
    "jobs": {"image", "convert", "volume", "config", "telemetry"},
    "image": {"telemetry"},
    "convert": {"image", "telemetry"},
    "volume": {"telemetry"},
    "config": {"volume", "image", "telemetry"},
    "telemetry": set(),
    "client": set(),
}
LEAVES = {"command", "store", "text"}


def rust_files():
    for root, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".rs"):
                yield os.path.relpath(os.path.join(root, f), SRC)


def module_of(path):
    """`api/routes/jobs.rs` -> ['api', 'routes', 'jobs']; `api/mod.rs` -> ['api']; the crate
    roots are `[]` (lib.rs) and `['<main>']` (main.rs, a crate of its own)."""
    parts = path[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts == ["lib"]:
        return []
    if parts == ["main"]:
        return ["<main>"]
    return parts


def code_only(text):
    """The text without comments, string and char literals, and `#[cfg(test)]` modules."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            j = text.find('"' + hashes, i + len(hashes) + 2)
            out.append('""')
            i = n if j < 0 else j + 1 + len(hashes)
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:]):
            m = re.match(r"'(\\.|[^\\'])'", text[i:])
            out.append("' '")
            i += m.end()
        else:
            out.append(c)
            i += 1
    code = "".join(out)
    cut = re.search(r"#\[cfg\(test\)\]\s*(pub\(crate\) )?mod tests", code)
    return code[: cut.start()] if cut else code


def used_paths(text, module):
    """Absolute module paths a file names through `super::`, `crate::` or `self::`."""
    out = set()
    for m in re.finditer(r"\b((?:super::)+|crate::|self::)((?:\w+::)*\w+)", text):
        prefix, rest = m.group(1), m.group(2).split("::")
        if prefix == "crate::":
            base = []
        elif prefix == "self::":
            base = list(module)
        else:
            base = list(module)[: len(module) - prefix.count("super::")]
        out.add(tuple(base + rest))
    # `use super::{a, b::c}` groups.
    for m in re.finditer(r"\buse\s+((?:super::)+|crate::)\{([^}]*)\}", text, re.S):
        prefix = m.group(1)
        base = [] if prefix == "crate::" else list(module)[: len(module) - prefix.count("super::")]
        for item in re.split(r",", m.group(2)):
            item = item.strip().split(" as ")[0]
            if item:
                out.add(tuple(base + item.split("::")))
    return out


def main():
    report = "--report" in sys.argv
    files = {tuple(module_of(p)): p for p in rust_files()}
    edges = {}
    for mod, path in files.items():
        text = code_only(open(os.path.join(SRC, path), encoding="utf-8").read())
        targets = set()
        for used in used_paths(text, mod):
            # The longest prefix that is a file of ours.
            for n in range(len(used), 0, -1):
                if used[:n] in files:
                    if used[:n] != mod:
                        targets.add(used[:n])
                    break
        edges[mod] = targets

    problems = []
    # Circles between siblings (files of one folder, the folder's mod.rs included).
    for folder in {m[:-1] for m in files if m}:
        members = [m for m in files if m and (m[:-1] == folder or m == folder)]
        graph = {m: {t for t in edges[m] if t in members} for m in members}
        for cycle in find_cycles(graph):
            problems.append("circle in src/%s: %s" % ("/".join(folder) or ".", " -> ".join("/".join(c) for c in cycle)))
    # Layers between folders, and circles between folders.
    folders = {}
    for mod, targets in edges.items():
        if not mod:
            continue
        top = mod[0]
        for t in targets:
            if t and t[0] != top:
                folders.setdefault(top, set()).add(t[0])
            if t and t[0] != top and top in LAYERS and t[0] not in LEAVES and t[0] not in LAYERS[top]:
                problems.append("layering: src/%s uses %s" % (files[mod], "::".join(t)))
    for cycle in find_cycles(folders):
        problems.append("circle between folders: " + " -> ".join(cycle))
    # The backend seam.
    lvm_outside = []
    for mod, path in files.items():
        if mod[:1] == ("volume",):
            continue
        text = code_only(open(os.path.join(SRC, path), encoding="utf-8").read())
        for m in LVM_NAMES.finditer(text):
            lvm_outside.append("%s: %s" % (path, m.group(1)))
    problems += ["LVM outside volume/: " + x for x in lvm_outside]
    # Long functions.
    longs = long_functions(files.values())
    for name, path, lines in longs:
        if name not in ALLOWED_LONG:
            problems.append("%s in src/%s has %d lines: split it, or name the protocol it spells out in ALLOWED_LONG" % (name, path, lines))
    print("circles: %d" % sum(1 for p in problems if p.startswith("circle")))
    print("layering inversions: %d" % sum(1 for p in problems if p.startswith("layering")))
    print("LVM names outside src/volume/: %d" % len(lvm_outside))
    print("functions over %d lines: %d" % (LONG, len(longs)))
    for name, path, lines in sorted(longs, key=lambda x: -x[2]):
        print("  %4d  %s  %s%s" % (lines, path, name, "  (" + ALLOWED_LONG[name] + ")" if name in ALLOWED_LONG else ""))
    if len(longs) > MAX_LONG:
        problems.append("%d functions over %d lines (at most %d)" % (len(longs), LONG, MAX_LONG))
    for p in problems:
        print("PROBLEM: " + p)
    if problems and not report:
        sys.exit(1)


def find_cycles(graph):
    """Every elementary circle, each once (small graphs)."""
    cycles, seen = [], set()

    def walk(start, node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    cycles.append(path + [start])
            elif nxt not in path and nxt > start:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return cycles


def long_functions(paths):
    """(name, path, lines) of every `fn` whose body spans more than LONG lines (tests left out)."""
    out = []
    for path in paths:
        text = open(os.path.join(SRC, path), encoding="utf-8").read()
        cut = re.search(r"#\[cfg\(test\)\]\s*(pub\(crate\) )?mod tests", text)
        if cut:
            text = text[: cut.start()]
        code = code_only(text)
        for m in re.finditer(r"(?m)^[ \t]*(?:pub(?:\([^)]*\))?\s+)?(?:async\s+)?(?:unsafe\s+)?fn\s+(\w+)", code):
            start = code.index("{", m.end()) if "{" in code[m.end():] else None
            semi = code.find(";", m.end())
            if start is None or (semi != -1 and semi < start):
                continue  # a declaration without a body
            depth, i = 0, start
            while i < len(code):
                if code[i] == "{":
                    depth += 1
                elif code[i] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            length = code.count("\n", m.start(), i) + 1
            if length > LONG:
                out.append((m.group(1), path, length))
    return out


if __name__ == "__main__":
    main()
