"""Coordinate pattern: decision policy, fine-tune buffer, planner and its tools."""
