"""Images on one GPU: a Qwen2.5-VL-7B-shaped model (random bf16 weights, ``load_format="dummy"``)
serves a batch of requests with one 448x448 image each (256 image tokens).

    python benchmarks/gpu_vl.py [--requests 64] [--max-tokens 128]
    python benchmarks/gpu_vl.py --tiny --device cpu --requests 4    # a smoke run of the script

Prints output and total tokens/s and the share of the run spent in the vision encoder (timed
around ``embed_images`` with a device sync), as a markdown table row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "vocab_size": 152064,
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3},
}
TINY = {**QWEN25_VL_7B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "vision_config": {**QWEN25_VL_7B["vision_config"], "depth": 2, "hidden_size": 64, "intermediate_size": 96,
                          "num_heads": 2, "out_hidden_size": 128, "fullatt_block_indexes": [1]}}


def write_checkpoint(path: str, config: dict) -> None:
    try:  # transformers >= 5.2x names the PIL processor apart; older releases have one class
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Processor
    except ImportError:
        from transformers import Qwen2VLImageProcessor as Processor

    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    Processor(patch_size=14, temporal_patch_size=2, merge_size=2).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture")
    args = ap.parse_args()
    from engine import LLM, SamplingParams

    config = TINY if args.tiny else QWEN25_VL_7B
    image = [config["vision_start_token_id"], config["image_token_id"], config["vision_end_token_id"]]
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(100, 150000, 8).tolist() + image + rng.integers(100, 150000, 16).tolist(),
                "multi_modal_data": {"image": rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)}}
               for _ in range(args.requests + 2)]
    warm, prompts = prompts[-2:], prompts[:-2]  # the warm-up's images are not the measured ones
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(d, config)
        llm = LLM(model=d, device=args.device, dtype="bfloat16", load_format="dummy", max_model_len=4096,
                  max_num_seqs=256, max_num_batched_tokens=8192)
        model, spent = llm.runner.model, [0.0]
        embed = model.embed_images
        sync = llm.runner.platform.synchronize

        def timed(*a, **kw):
            sync()
            t = time.perf_counter()
            out = embed(*a, **kw)
            sync()
            spent[0] += time.perf_counter() - t
            return out

        model.embed_images = timed
        llm.generate(warm, SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        spent[0] = 0.0
        sync()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        llm.shutdown()
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    print(f"| {'tiny' if args.tiny else 'Qwen2.5-VL-7B shape'} bf16, {args.requests} x 448x448 "
          f"({n_in // args.requests} prompt tokens each), {args.max_tokens} out | {n_out / dt:,.0f} out tok/s | "
          f"{(n_in + n_out) / dt:,.0f} total tok/s | encoder {100 * spent[0] / dt:.1f}% of {dt:.2f} s |")


if __name__ == "__main__":
    main()
