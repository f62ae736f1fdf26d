"""Schedules: the tile, loop and split choices of each target, as small commented functions."""
