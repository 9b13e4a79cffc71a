"""Offline quick start: build a small T5 v1.1-shaped model, save it in the Hub layout, reload it,
run a training step and decode a few tokens with the key/value cache. No network, no downloads."""

from __future__ import annotations

import tempfile
import time

import torch

import t5kit


def main() -> None:
    torch.manual_seed(0)
    config = t5kit.T5Config(
        vocab_size=512, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )
    model = t5kit.T5ForConditionalGeneration(config)
    print(f"built {type(model).__name__}: {model.num_parameters():,} parameters")

    # One optimisation step on a toy batch: learn to copy the input.
    inputs = torch.randint(2, config.vocab_size, (8, 12))
    inputs[:, -1] = config.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(20):
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0:
            print(f"step {step:2d}  loss {loss.item():.3f}")

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)  # config.json + model.safetensors, as on the Hub
        reloaded = t5kit.AutoModelForSeq2SeqLM.from_pretrained(directory)
        print(f"saved and reloaded from {directory}: {type(reloaded).__name__}")

    # Greedy decoding, one step at a time: encode once, then reuse the cache.
    with torch.no_grad():
        start = time.perf_counter()
        encoder_outputs = reloaded.get_encoder()(input_ids=inputs[:2])
        cache = t5kit.EncoderDecoderCache(config.num_decoder_layers, max_length=16)
        tokens = torch.full((2, 1), config.decoder_start_token_id)
        for _ in range(12):
            out = reloaded(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, -1:], past_key_values=cache)
            tokens = torch.cat([tokens, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        elapsed = time.perf_counter() - start
    print("input   :", inputs[0].tolist())
    print("decoded :", tokens[0, 1:].tolist())
    print(f"decoded 2 x 12 tokens in {elapsed * 1000:.0f} ms")


if __name__ == "__main__":
    main()
