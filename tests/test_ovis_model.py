"""The Ovis-Image builders: the exact 7B architecture (meta device) and path loading."""

import numpy as np
import torch

from rlhf_image.recipes.ovis_image.model import ovis_image_7b, ovis_image_7b_transformer
from rlhf_image.policy import FlowPolicy
from rlhf_image.sampling import generate


def test_7b_transformer_has_the_report_architecture_and_parameter_count():
    model = ovis_image_7b_transformer(device="meta")
    num_params = sum(p.numel() for p in model.parameters())
    assert round(num_params / 1e9, 2) == 7.37
    assert len(model.transformer_blocks) == 6 and len(model.single_transformer_blocks) == 27
    config = model.config
    assert (config.num_attention_heads, config.attention_head_dim) == (24, 128)
    assert tuple(config.axes_dims_rope) == (16, 56, 56) and config.in_channels == 64
    assert config.joint_attention_dim == 2048
    assert all(p.is_meta for p in model.parameters())


def test_pipeline_loads_each_part_from_a_local_folder(ovis_pipe, tmp_path):
    ovis_pipe.save_pretrained(tmp_path / "ovis")
    loaded = ovis_image_7b(str(tmp_path / "ovis"), torch_dtype=torch.float32)
    kw = dict(height=32, width=32, num_steps=3, guidance_scale=2.0)
    ours = generate(FlowPolicy.from_pipeline(loaded, max_sequence_length=16), ["a"], [0], **kw)
    ref = generate(FlowPolicy.from_pipeline(ovis_pipe, max_sequence_length=16), ["a"], [0], **kw)
    np.testing.assert_array_equal(ours.images.numpy(), ref.images.numpy())
    # A separately stored transformer (an SFT result) replaces the base one.
    ovis_pipe.transformer.save_pretrained(tmp_path / "sft")
    swapped = ovis_image_7b(str(tmp_path / "ovis"), transformer=str(tmp_path / "sft"), torch_dtype=torch.float32)
    assert torch.equal(next(swapped.transformer.parameters()), next(ovis_pipe.transformer.parameters()))
