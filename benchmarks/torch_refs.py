"""PyTorch references of benchmarks/accelerator.py: the same work in PyTorch on the same device.

Images: torchvision's ResNet (tests/torch_resnet.py where torchvision is absent) with
channels_last, bf16 autocast on CUDA and Adam, eager and `torch.compile`. Temporal: nn.GRU /
nn.LSTM / nn.TransformerEncoder training steps (float32, Adam) on the same segments.
"""

import statistics
import time

import common


def image_rates(args, arch: str, batch: int, variants=(False,)) -> dict:
  """PyTorch train and inference images/s of the same network size and batch (one device)."""
  import torch  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.backends.cudnn.benchmark = True  # as PyTorch training scripts set it: fastest kernels
  depth = int(arch.replace('resnet', ''))
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
    net = getattr(torchvision.models, arch)(num_classes=7)
    source = 'torchvision'
  except ImportError:
    import torch_resnet  # pylint: disable=g-import-not-at-top
    net = torch_resnet.TorchResNet(depth, args.width, num_classes=7)
    source = 'tests/torch_resnet.py'
  net = net.to(device, memory_format=torch.channels_last)
  opt = torch.optim.Adam(net.parameters(), lr=1e-3)
  images = torch.randint(0, 256, (batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                         device=device).to(memory_format=torch.channels_last)
  labels = torch.randint(0, 7, (batch,), device=device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda')
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  rows = {}
  for compiled in variants:  # False: eager; True: torch.compile
    model = torch.compile(net) if compiled else net

    def train(model=model):
      for _ in range(args.steps):
        with autocast:
          out = model((images.float() - 127.5) / 127.5)
          out = out if out.shape[-1] == 7 else net.fc(out)
          loss = torch.nn.functional.cross_entropy(out.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
      sync()

    def infer(model=model):
      with torch.inference_mode(), autocast:
        for _ in range(args.steps):
          model((images.float() - 127.5) / 127.5)
      sync()

    name = 'torch.compile' if compiled else 'eager'
    for kind, fn in (('train', train), ('eval', infer)):
      start = time.perf_counter()
      fn()  # warm-up (and compilation)
      first_s = time.perf_counter() - start
      times = common.interleaved_times({'torch': fn}, args.reps, 0)[0]['torch']
      rows[f'{kind} {name}'] = {'images_per_s': batch * args.steps / statistics.median(times),
                                'first_call_s': first_s, 'source': source}
  return rows


def temporal_segments_per_second(args, name: str, layers: int, x, target) -> float:
  """Training-step segments/s of PyTorch's `name` encoder on the segments `x` ([b, t, dim])
  regressing `target` ([b, t, hidden])."""
  import torch  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  b, _, dim = x.shape
  hidden = target.shape[-1]
  if name == 'transformer':
    layer = torch.nn.TransformerEncoderLayer(hidden, 4, hidden, 0.0, batch_first=True)
    net = torch.nn.Sequential(torch.nn.Linear(dim, hidden),
                              torch.nn.TransformerEncoder(layer, layers)).to(device)
    forward = net
  else:
    rnn = (torch.nn.GRU if name == 'gru' else torch.nn.LSTM)(dim, hidden, batch_first=True)
    net = rnn.to(device)
    forward = lambda t, net=net: net(t)[0]
  opt = torch.optim.Adam(net.parameters(), lr=1e-4)
  tx_, ty = torch.from_numpy(x).to(device), torch.from_numpy(target).to(device)
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

  def call():
    for _ in range(args.steps):
      loss = torch.mean((forward(tx_) - ty) ** 2)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    sync()

  torch_times = common.interleaved_times({'torch': call}, args.reps, 1)[0]['torch']
  return b * args.steps / statistics.median(torch_times)
