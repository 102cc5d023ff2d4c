"""benchmarks/deviceless.py's readers of XLA's dumps, on excerpts of real dumps (the GPU program
of the train step, compiled without a GPU); the compilation itself needs jax's CUDA plugin,
which the test environment does not install."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
import deviceless  # pylint: disable=wrong-import-position

# Top-level lines are launched by the host; indented ones run inside the command buffer above.
THUNKS = """\
000: kCommandBuffer [source        | next=038 (1) ]
    001: kCustomKernel [source       | sink        ] loop_multiply_fusion_2 grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
    007: kCustomKernel [source       | next=008 (1)] loop_slice_fusion grid: [1, 1, 1] threads: [2, 1, 1]  shared_memory: 0 bytes
    008: kCopy         [prev=007 (1) | next=011 (3)] kCopy
038: kConvolution   [prev=000 (1)  | next=039 (1) ] kConvolution
039: kCustomKernel  [prev=038 (1)  | next=040 (1) ] input_reduce_fusion_43 grid: [1, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
040: kCustomKernel  [prev=039 (1)  | next=041 (1) ] loop_convert_fusion_1 grid: [32, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
000: kCommandBuffer [prev=040 (1) | next=046 (1)]
    001: kCustomKernel [source       | sink        ] input_transpose_fusion_37 grid: [2, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
"""

HLO = """\
HloModule jit_train_step, is_scheduled=true

%region_0.2 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add = f32[] add(%a, %b)
}

%branch (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%p)
}

%fused_reduce (param_0.2: bf16[8,16,16,8]) -> f32[] {
  %param_0.2 = bf16[8,16,16,8]{3,2,1,0} parameter(0)
  %c = f32[8,16,16,8]{3,2,1,0} convert(%param_0.2)
  %bc = f32[16384]{0} bitcast(%c)
  %z = f32[] constant(0)
  ROOT %r = f32[] reduce(%bc, %z), dimensions={0}, to_apply=%region_0.2
}

ENTRY %main.3 (x.1: bf16[8,16,16,3], w.1: bf16[3,3,3,8], k.1: f32[3,3,512,512], q.1: pred[]) -> (f32[], f32[3,3,512,512]) {
  %w.1 = bf16[3,3,3,8]{3,2,1,0} parameter(1), sharding={replicated}, metadata={op_name="w"}
  %x.1 = bf16[8,16,16,3]{3,2,1,0} parameter(0), sharding={replicated}
  %k.1 = f32[3,3,512,512]{3,2,1,0} parameter(2)
  %cudnn-conv.1 = (bf16[8,16,16,8]{3,2,1,0}, u8[0]{0}) custom-call(%x.1, %w.1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(f)/conv"}
  %get-tuple-element.1 = bf16[8,16,16,8]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  %input_reduce_fusion = f32[] fusion(%get-tuple-element.1), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(f)/reduce_sum"}
  %copy.618 = f32[3,3,512,512]{3,2,1,0} copy(%k.1), metadata={scheduling_name="copy.618"}
  %loop_add_fusion = f32[] fusion(%input_reduce_fusion, %input_reduce_fusion, %input_reduce_fusion, %input_reduce_fusion, %input_reduce_fusion, /*index=5*/%x.1), kind=kLoop, calls=%fused_reduce
  ROOT %tuple.2 = (f32[], f32[3,3,512,512]{3,2,1,0}) tuple(%loop_add_fusion, %copy.618)
}
"""


def test_thunk_counts_split_host_launches_from_command_buffers():
  counts = deviceless.thunk_counts(THUNKS)
  assert counts['host'] == {'kCommandBuffer': 2, 'kConvolution': 1, 'kCustomKernel': 2}
  assert counts['in_graphs'] == {'kCustomKernel': 3, 'kCopy': 1}


def test_shape_bytes():
  assert deviceless.shape_bytes('bf16[8,16,16,3]{3,2,1,0}') == 8 * 16 * 16 * 3 * 2
  assert deviceless.shape_bytes('(f32[], pred[7], u8[0]{0})') == 4 + 7
  assert deviceless.shape_bytes('s32[2,3]') == 24


def test_hlo_summary_counts_the_entry_computations_launched_ops():
  summary = deviceless.hlo_summary(HLO)
  conv = 8 * 16 * 16 * 8 * 2  # the result (the u8[0] scratch is empty)
  x, w, kernel = 8 * 16 * 16 * 3 * 2, 3 * 3 * 3 * 8 * 2, 3 * 3 * 512 * 512 * 4
  assert summary['bytes_by_kind'] == {
      '__cudnn$convForward': [1, conv + x + w],
      'input_reduce_fusion': [1, 4 + conv],  # its operand: the conv's result, via the tuple
      'copy': [1, 2 * kernel],
      'loop_add_fusion': [1, 4 + 5 * 4 + x]}  # the sixth operand follows XLA's /*index=5*/
  assert summary['launched_ops'] == 4
  assert summary['estimated_bytes'] == conv + x + w + 4 + conv + 2 * kernel + 4 + 5 * 4 + x
  assert (summary['copies'], summary['copied_bytes']) == (1, kernel)  # written once
  assert (summary['conditionals'], summary['while_loops']) == (0, 0)


def test_hlo_summary_finds_conditionals_outside_the_entry():
  text = HLO.replace('ROOT %n = f32[8]{0} negate(%p)',
                     '%t = pred[] constant(true)\n  ROOT %n = f32[8]{0} conditional(%t, %p, %p), '
                     'branch_computations={%region_0.2, %region_0.2}')
  assert deviceless.hlo_summary(text)['conditionals'] == 1


def test_variants_parse_as_python_literals_and_default_is_reserved():
  args = deviceless.parse_args(['--out', 'x', '--variant', 'g1:xla_gpu_graph_min_graph_size=1',
                                '--variant', 'cf:xla_gpu_experimental_enable_conv_fusion=True'])
  assert args.variants == {'default': {}, 'g1': {'xla_gpu_graph_min_graph_size': 1},
                           'cf': {'xla_gpu_experimental_enable_conv_fusion': True}}
  with pytest.raises(SystemExit):
    deviceless.parse_args(['--out', 'x', '--variant', 'default:xla_gpu_graph_min_graph_size=1'])
  with pytest.raises(SystemExit):
    deviceless.parse_args(['--out', 'x', '--steps', 'train,predict'])


def test_config_variants_parse_as_settings_beside_the_packages_config():
  args = deviceless.parse_args(['--out', 'x', '--config-variant',
                                'hwio:model.kernel_layout=HWIO,model.mask_bits=True'])
  assert args.configs == {'': {}, '+hwio': {'model.kernel_layout': 'HWIO',
                                            'model.mask_bits': True}}
  assert deviceless.parse_args(['--out', 'x']).configs == {'': {}}
