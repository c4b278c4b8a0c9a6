"""Exports trained cells of one task as a versioned TF Serving SavedModel.

Example:
  python -m export --runs_dir=runs/p --task=p --export_dir=exports
  python -m export --runs_dir=runs/p --task=p --export_dir=exports --cells=r00   # the 8 folds of repeat 0
  python -m export --runs_dir=runs/p --task=p --export_dir=exports --cells=r00_f03 --version=7

Writes <export_dir>/pdx_<task>/<version>/ (saved_model.pb, variables/, assets.extra/pdx_export.json, the
cells' Keras models and config.json). Default: the ensemble of every complete cell of the task, as version
max+1. Serve it with TF Serving (model base path <export_dir>/pdx_<task>) or run `python -m predict` on it.
"""

from pdx_tf import cli  # pylint: disable=wrong-import-order
cli.quiet_tensorflow()  # Before anything loads TensorFlow: no C++ start-up lines unless --verbosity >= 1.


from absl import app
from absl import flags

from pdx_tf import cli
from pdx_tf.errors import PdxError
from pdx_tf.serving.export import export_tasks, ExportConfig

_RUNS_DIR = flags.DEFINE_string("runs_dir", None, "Training output: a task folder or a parent of several.",
                                required=True)
_TASK = flags.DEFINE_enum("task", None, ["p", "sb", "p,sb", "regions"], "Task whose cells to export; p,sb: both heads"
                          " of a joint grid (X/pdx_p and X/pdx_sb); regions: the PCI regions grid (X/pdx_regions,"
                          " with the predict_regions signature).", required=True)
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Export root X; writes X/pdx_<task>/<version>/.",
                                  required=True)
_CELLS = flags.DEFINE_list("cells", [], "Cells to export: rRR_fFF (one cell) or rRR (all folds of a repeat); "
                           "empty: every complete cell of the task (the ensemble).")
_VERSION = flags.DEFINE_integer("version", None, "Version number to write (must be new); default max + 1.")


def _fail(message) -> None:
  cli.exit_with_error("export", message)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = ExportConfig(runs_dir=_RUNS_DIR.value, task=_TASK.value, export_dir=_EXPORT_DIR.value,
                          cells=tuple(_CELLS.value), version=_VERSION.value)
  except ValueError as error:  # invalid flag values
    _fail(str(error))
  try:
    version_dirs = export_tasks(config)  # also writes the config into each version's assets.extra/config.json
  except PdxError as error:
    _fail(str(error))
  for version_dir in version_dirs:
    print(f"Exported {version_dir}")


if __name__ == "__main__":
  app.run(main)
