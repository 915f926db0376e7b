"""Executes notebooks/mae_visualize.ipynb in place and saves it with outputs.

  python benchmarks/run_notebook.py [--checkpoint workdirs/demo] [--fetch-official]

The notebook's checkpoint is `--checkpoint` (default `workdirs/demo`, what
`make demo` writes), passed through MAE_CHECKPOINT; its own default stays
`../workdirs/demo`. Old outputs are cleared first, the kernel runs on the CPU
with the notebook folder as working directory, and no execution timestamps
are recorded, so reruns change only what the figures change. With
`--fetch-official` the optional last cell downloads the official
mae_visualize_vit_large.pth and the demo photograph (MAE_FETCH_OFFICIAL=1).
Stops with one line if the checkpoint is missing or a cell fails; warns when
an output names the checkpoint's absolute path.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'mae_visualize.ipynb')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--checkpoint', default=os.path.join(ROOT, 'workdirs',
                                                           'demo'),
                      help='mae_jax checkpoint directory, training workdir '
                      'or official .pth (default: workdirs/demo)')
  parser.add_argument('--fetch-official', action='store_true',
                      help='let the optional last cell download the official '
                      'ViT-Large visualization checkpoint (about 1.3 GB)')
  parser.add_argument('--timeout', type=int, default=600,
                      help='seconds per cell (default 600)')
  args = parser.parse_args(argv)
  import nbclient  # pylint: disable=import-outside-toplevel
  from nbclient.exceptions import CellExecutionError  # pylint: disable=import-outside-toplevel
  import nbformat  # pylint: disable=import-outside-toplevel

  checkpoint = os.path.abspath(args.checkpoint)
  if not os.path.exists(checkpoint):
    print(f'error: --checkpoint {args.checkpoint}: no such file or directory '
          '(run `make demo` first, or pass another checkpoint)', file=sys.stderr)
    return 2
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      cell.outputs, cell.execution_count = [], None
  os.environ.update(MAE_CHECKPOINT=checkpoint, JAX_PLATFORMS='cpu',
                    MAE_FETCH_OFFICIAL='1' if args.fetch_official else '0')
  client = nbclient.NotebookClient(
      nb, kernel_name='python3', timeout=args.timeout, record_timing=False,
      resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  try:
    client.execute()
  except CellExecutionError as e:
    print(f'error: a notebook cell failed: {str(e).splitlines()[0]}',
          file=sys.stderr)
    return 1
  nbformat.write(nb, NOTEBOOK)
  outputs = json.dumps([c.get('outputs', []) for c in nb.cells])
  if checkpoint in outputs:
    print(f'warning: the outputs name {checkpoint}', file=sys.stderr)
  pngs = outputs.count('image/png')
  print(f'wrote {os.path.relpath(NOTEBOOK)}: {pngs} figures from {checkpoint}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
