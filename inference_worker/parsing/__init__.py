"""Turning model text into task results: MineRL action dicts and preference labels."""
