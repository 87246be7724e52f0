"""Episode traces in SQLite (frames, requests, replies, timings) and their SFT export."""
