"""The import graph of pdx_tf, read with ast: module count, arrows, loops, arrows from the core into a stage.

    python benchmarks/import_graph.py .          # from the repository root (or pass another checkout's root)
    python benchmarks/import_graph.py . --no_record   # print only (default: also append the raw output line)

The core is pdx_tf/*.py, a stage is a sub-package (pdx_tf/data, training, evaluation, serving, phantom, testing, and
demo: the README's main job, which runs every stage in turn, on the top floor).
An arrow is an import anywhere in a module (function-level ones too); `if TYPE_CHECKING:` imports are annotations
only, never executed, and are listed apart. A loop is a strongly connected component of more than one module.
A room is the core or one stage; room arrows are the module arrows between different rooms, counted once a pair
; a room loop is two rooms that reach each other along room arrows.
The figures also go, as one JSON line, to benchmarks/results/import_graph.jsonl (results_io), unless --no_record.
"""
import ast, os, sys
if "--help" in sys.argv or "-h" in sys.argv:
  sys.stdout.write(__doc__)
  sys.exit(0)
positional = [argument for argument in sys.argv[1:] if not argument.startswith("--")]
root = positional[0] if positional else "."
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

rooms = sorted({stage(m) or "core" for m in mods})
room_arrows = sorted({(stage(s) or "core", stage(t) or "core") for s, t in edges
                      if (stage(s) or "core") != (stage(t) or "core")})
room_graph = {room: [t for s, t in room_arrows if s == room] for room in rooms}
def reaches(start, goal, seen=()):
  return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen + (nxt,))) for nxt in room_graph[start])
room_loops = sorted({tuple(sorted((a, b))) for a, b in room_arrows if reaches(b, a)})
print(f"rooms={len(rooms)} ({', '.join(rooms)}) room_arrows={len(room_arrows)} room_loops={room_loops or 'none'}")
figures = {"modules": len(mods), "arrows": len(edges), "loops": sccs, "type_checking_imports": type_only,
           "core_to_stage_arrows": core_up,
           "stage_to_stage_arrows": len(cross), "rooms": rooms, "room_arrows": room_arrows, "room_loops": room_loops}
if "--no_record" not in sys.argv:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import results_io
  print("raw output:", results_io.record_figures("import_graph", figures))
