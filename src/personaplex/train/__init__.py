"""Fine-tuning PersonaPlex / Moshi models on full-duplex conversations.

    data.py      the dataset format (stereo wav + word timestamps JSON), word -> frame alignment, shard reader
    prepare.py   `train-prepare`: conversations -> token shards + manifest (resumable, bad samples listed)
    sample.py    the training sample: the persona prompt exactly as inference builds it, then the conversation
    loss.py      masked, weighted cross-entropy per stream (text, semantic, acoustic)
    lora.py      low-rank adapters swapped in from outside the model, merged for export
    parallel.py  torchrun process groups, FSDP2 `fully_shard`, the sharded run checkpoint
    loop.py      `TrainConfig` and the training loop (`train`)
    export.py    a run -> a checkpoint in the released layout (or a LoRA file)
    synth.py     scripted dialogues -> training conversations with a pluggable TTS (espeak-ng built in)
    cli.py       `personaplex train-prepare | train | train-export | synth`

docs/training.md describes the format, the recipe and the commands. Nothing here runs at import time.
"""
