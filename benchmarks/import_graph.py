"""The import graph of pdx_tf, read with ast: module count, arrows, loops, arrows from the core into a stage.

    python benchmarks/import_graph.py .          # from the repository root (or pass another checkout's root)

The core is pdx_tf/*.py, a stage is a sub-package (pdx_tf/data, training, evaluation, serving, phantom, testing).
An arrow is an import anywhere in a module (function-level ones too); `if TYPE_CHECKING:` imports are annotations
only, never executed, and are listed apart. A loop is a strongly connected component of more than one module.
pdx_tf/demo.py runs every stage in turn (like a binary), so its arrows into the stages are expected.
"""
import ast, os, sys
root = sys.argv[1] if len(sys.argv) > 1 else "."
pkg = os.path.join(root, "pdx_tf")
mods = {}
for d, _, fs in os.walk(pkg):
  for f in fs:
    if f.endswith(".py"):
      p = os.path.join(d, f)
      rel = os.path.relpath(p, root)[:-3].replace(os.sep, ".")
      if rel.endswith(".__init__"): rel = rel[:-9]
      mods[rel] = p
edges = set()
type_only = []
for m, p in mods.items():
  tree = ast.parse(open(p).read())
  ispkg = p.endswith("__init__.py")
  skipped = set()
  for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports are annotations only, never executed
    if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
      for inner in node.body:
        for sub in ast.walk(inner):
          skipped.add(id(sub))
  for node in ast.walk(tree):
    if id(node) in skipped:
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        type_only.append((m, node.module if isinstance(node, ast.ImportFrom) else node.names[0].name))
      continue
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = m.split(".") if ispkg else m.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        b = ".".join(base + ([node.module] if node.module else []))
      else:
        b = node.module
      sub = [b + "." + a.name for a in node.names if b + "." + a.name in mods]
      targets = sub if len(sub) == len(node.names) else sub + [b]
    for t in targets:
      while t and t not in mods: t = t.rpartition(".")[0]
      if t and t != m and t != "pdx_tf": edges.add((m, t))
# Tarjan SCC
import itertools
graph = {m: sorted(t for s, t in edges if s == m) for m in mods}
index, low, stack, on, sccs, c = {}, {}, [], set(), [], itertools.count()
def sc(v):
  index[v] = low[v] = next(c); stack.append(v); on.add(v)
  for w in graph[v]:
    if w not in index: sc(w); low[v] = min(low[v], low[w])
    elif w in on: low[v] = min(low[v], index[w])
  if low[v] == index[v]:
    comp = []
    while True:
      w = stack.pop(); on.discard(w); comp.append(w)
      if w == v: break
    if len(comp) > 1: sccs.append(sorted(comp))
sys.setrecursionlimit(10000)
for v in sorted(mods):
  if v not in index: sc(v)
def stage(m):
  parts = os.path.relpath(mods[m], root).split(os.sep)
  return parts[1] if len(parts) > 2 else None
core_up = sorted((s, t) for s, t in edges if stage(s) is None and stage(t) is not None)
cross = sorted((s, t) for s, t in edges if stage(s) and stage(t) and stage(s) != stage(t))
print(f"modules={len(mods)} arrows={len(edges)}")
print("loops:", sccs or "none")
print("annotation-only (TYPE_CHECKING) imports, not counted:", type_only)
print("core->stage arrows:", core_up or "none")
print("stage->stage arrows:")
for s, t in cross: print("  ", s, "->", t)
