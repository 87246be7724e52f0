"""RL-VLM-F preference labelling: frame pairs with ground-truth progress, VLM labels, a
`vlm_query_log.csv` in RL-VLM-F's columns and an accuracy-vs-difficulty plot."""
