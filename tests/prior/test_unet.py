from __future__ import annotations

import math

import pytest
import torch

from d4a_batch.config import PriorConfig
from d4a_batch.prior.unet import AttentionBlock, build_unet, timestep_embedding

PAPER = PriorConfig(
    image_size=256,
    num_channels=192,
    num_res_blocks=3,
    channel_mult=(1, 1, 2, 2, 4, 4),
    attention_resolutions=(16, 8),
    num_heads=4,
    learn_sigma=False,
    bands=("g", "r", "i"),
)


def test_paper_architecture_parameter_count():
    model = build_unet(PAPER, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 369_547_779


def test_state_dict_keys_and_shapes_small_config():
    # improved-diffusion UNetModel(in 3, model 32, out 6, 1 res block, channel_mult (1, 2),
    # attention at ds 2 (= 16 px of 32), 4 heads, scale-shift norm), derived by hand:
    cfg = PriorConfig(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(16,),
        num_heads=4,
        learn_sigma=True,
        use_scale_shift_norm=True,
    )
    expected = {
        "time_embed.0.weight": (128, 32),
        "time_embed.2.weight": (128, 128),
        "input_blocks.0.0.weight": (32, 3, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (32,),
        "input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (64, 128),
        "input_blocks.1.0.out_layers.0.bias": (32,),
        "input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
        "input_blocks.2.0.op.weight": (32, 32, 3, 3),
        "input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
        "input_blocks.3.1.norm.weight": (64,),
        "input_blocks.3.1.qkv.weight": (192, 64, 1),
        "input_blocks.3.1.proj_out.weight": (64, 64, 1),
        "middle_block.0.emb_layers.1.weight": (128, 128),
        "middle_block.1.qkv.bias": (192,),
        "middle_block.2.out_layers.3.weight": (64, 64, 3, 3),
        "output_blocks.0.0.in_layers.2.weight": (64, 128, 3, 3),
        "output_blocks.0.0.skip_connection.weight": (64, 128, 1, 1),
        "output_blocks.0.1.qkv.weight": (192, 64, 1),
        "output_blocks.1.0.skip_connection.weight": (64, 96, 1, 1),
        "output_blocks.1.2.conv.weight": (64, 64, 3, 3),
        "output_blocks.2.0.skip_connection.weight": (32, 96, 1, 1),
        "output_blocks.3.0.in_layers.0.weight": (64,),
        "output_blocks.3.0.skip_connection.weight": (32, 64, 1, 1),
        "out.0.weight": (32,),
        "out.2.weight": (6, 32, 3, 3),
        "out.2.bias": (6,),
    }
    sd = build_unet(cfg, device="meta").state_dict()
    for k, shape in expected.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    absent = [
        "input_blocks.1.0.skip_connection.weight",  # 32 -> 32: identity
        "input_blocks.1.1.qkv.weight",  # no attention at ds 1
        "output_blocks.4.0.in_layers.0.weight",  # (1 + 1) blocks per level x 2 levels
        "input_blocks.4.0.op.weight",  # no downsample after the last level
        "label_emb.weight",
    ]
    for k in absent:
        assert k not in sd, k
    assert len([k for k in sd if k.startswith("output_blocks.") and k.endswith("qkv.weight")]) == 2


def test_forward_shapes_and_input_checks(tiny_cfg, random_unet):
    model = random_unet(tiny_cfg).eval()
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 500, 999])
    out = model(x, t)
    assert out.shape == (3, 6, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="timesteps"):
        model(x, t[:2])
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(3, 2, 16, 16), t)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(3, 3, 15, 15), t)
    # timestep conditioning matters
    assert not torch.allclose(model(x, t), model(x, t.flip(0)))


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 3.0, 250.5])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (3, 7)
    for j in range(3):
        w = math.exp(-math.log(10000.0) * j / 3)
        torch.testing.assert_close(emb[:, j], torch.cos(t * w))
        torch.testing.assert_close(emb[:, 3 + j], torch.sin(t * w))
    assert (emb[:, 6] == 0).all()


def test_attention_matches_reference_qkv_layout():
    # improved-diffusion's QKVAttention: qkv [b, 3c, T] -> [b*heads, 3*ch, T], split q|k|v,
    # weights softmax((q/ch^1/4)^T (k/ch^1/4)), output einsum("bts,bcs->bct").
    torch.manual_seed(0)
    c, heads, b, side = 64, 4, 2, 4
    block = AttentionBlock(c, num_heads=heads)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    x = torch.randn(b, c, side, side)
    xf = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(xf)).reshape(b * heads, -1, side * side)
    ch = c // heads
    q, k, v = qkv.split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    h = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    ref = (xf + block.proj_out(h)).reshape(b, c, side, side)
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_autocast_close_to_float32(tiny_cfg, random_unet):
    model = random_unet(tiny_cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 700])
    ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05


def test_gradient_checkpointing_same_gradients(tiny_cfg, random_unet):
    model = random_unet(tiny_cfg)
    ckpt = build_unet(tiny_cfg, use_checkpoint=True)
    ckpt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([5, 900])
    model(x, t).square().sum().backward()
    ckpt(x, t).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bfloat16_autocast(tiny_cfg, random_unet):
    model = random_unet(tiny_cfg).eval().cuda()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    t = torch.tensor([1, 100, 500, 999], device="cuda")
    ref = model(x, t)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 0.05
    torch.testing.assert_close(ref.cpu(), model.cpu()(x.cpu(), t.cpu()), rtol=1e-3, atol=1e-4)
