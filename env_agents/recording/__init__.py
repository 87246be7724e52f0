"""Expert recordings in the capture format (video.mp4, events.jsonl, frame_ts.bin,
meta.json) and the VLA action layout. Torch-free."""
