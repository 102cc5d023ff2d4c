"""GRU / LSTM layers: affectjax's `temporal.RecurrentLayer` against flax's `nn.RNN` cells.

Both follow PyTorch's equations with the same parameter layout. `RecurrentLayer` projects the
input of every frame in one matrix product before the scan, as cuDNN does; flax's `GRUCell` /
`OptimizedLSTMCell` project it inside the scan, frame by frame. Training steps (forward,
backward, Adam) on [segments, length, features] inputs, timed in turn (benchmarks/common.py).

  python benchmarks/bench_rnn.py                     # the paper's size and the demo's
  python benchmarks/bench_rnn.py --shapes 8,250,512,1024
"""
import argparse
import os
import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from affectjax.models import temporal  # pylint: disable=g-import-not-at-top,wrong-import-position


class FlaxCells(nn.Module):
  """One flax `nn.RNN` layer over GRUCell / OptimizedLSTMCell (the reference)."""
  hidden: int
  cell: str

  @nn.compact
  def __call__(self, x):
    cell = (nn.GRUCell(self.hidden) if self.cell == 'gru'
            else nn.OptimizedLSTMCell(self.hidden))
    zero = jnp.zeros((x.shape[0], self.hidden), x.dtype)
    return nn.RNN(cell)(x, initial_carry=zero if self.cell == 'gru' else (zero, zero))


def step_fn(layer, x, y):
  """A jitted Adam training step of `layer` on the MSE to `y`; returns (step, params, opt)."""
  params = layer.init(jax.random.PRNGKey(0), x)
  tx = optax.adam(1e-4)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((layer.apply(p, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step, params, tx.init(params)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shapes', default='8,250,512,1024;8,32,128,128',
                      help='segments,length,features,hidden; several separated by ;')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--reps', type=int, default=5)
  args = parser.parse_args()
  rows = []
  for shape in args.shapes.split(';'):
    b, length, dim, hidden = (int(v) for v in shape.split(','))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, length, dim), np.float32))
    y = jnp.asarray(rng.standard_normal((b, length, hidden), np.float32))
    for cell in ('gru', 'lstm'):
      print(f'{cell} {shape} ...', flush=True)
      runs = {}
      for name, layer in (('flax', FlaxCells(hidden, cell)),
                          ('affectjax', temporal.RecurrentLayer(hidden, cell))):
        step, params, opt_state = step_fn(layer, x, y)
        holder = {'state': (params, opt_state)}

        def run(step=step, holder=holder):
          for _ in range(args.steps):
            *state, loss = step(*holder['state'])
            holder['state'] = tuple(state)
          jax.block_until_ready(loss)
        runs[name] = run
      wall, _ = common.interleaved_times(runs, args.reps)
      rate = {k: b * args.steps / statistics.median(v) for k, v in wall.items()}
      rows.append((cell, shape, f"{rate['flax']:.1f}", f"{rate['affectjax']:.1f}",
                   f"{common.paired_ratio(wall, 'affectjax', 'flax'):.2f}x"))
  print(common.format_table(('cell', 'segments,length,features,hidden', 'flax nn.RNN seg/s',
                             'RecurrentLayer seg/s', 'ratio'), rows))
  print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}; command: {common.command_line()}')


if __name__ == '__main__':
  main()
