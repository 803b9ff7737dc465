"""The from-zero learning path: `kiln learn` lists the lessons, `kiln learn N` runs one."""
