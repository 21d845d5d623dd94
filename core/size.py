"""What the challenge counts: code bytes plus compressed model bytes, against 16,000,000 (decimal).

The code bytes are those of the one train_gpt.py a submission ships, which `loopgolf export` generates
(tools/script.py counts them for a config)."""

CHALLENGE_LIMIT = 16_000_000
