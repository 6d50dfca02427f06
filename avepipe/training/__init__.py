"""Training: one run harness and the three loops that use it.

- ``harness``        seeding and RNG state, determinism, autocast, checkpoint.pt / log.jsonl with the
                     effective config (resume only on an exact match), z-scoring, the learning-curve plot
- ``schedule``       optimizer and lr schedule (warm-up, multistep, cosine; per epoch or per step)
- ``ave_data``       AVE manifest + feature stores -> tensors per split; the batch feeder
- ``ave``            the AVE heads loop (full / weak / cml), evaluation, metrics.json
- ``dense_data``     UnAV-100 ragged window/hop stores + events
- ``dense``          the dense UnAV-100 head loop, detection, predictions.json and plots
- ``contrastive``    the fine-tuning model and InfoNCE loss (CACE-Net eq. 9)
- ``finetune_data``  fine-tuning videos, frames, waveforms and partner vectors
- ``finetune``       the InfoNCE fine-tuning loop

Each loop module has a ``run(manifest, <stores>, out_dir, *, <options>, seed, config=None)``
entry that opens the files and calls the loop (the CLI calls these). Submodules are
imported on use: importing this package is cheap.
"""
