"""The command-line jobs (``dali-relabel <command>``): convert the authors' release, generate label
maps with a teacher, draw a map over its image, and the end-to-end demo on generated data."""
