"""Print what the zstd codec saved: two ``savevm demo --json`` reports side by side."""

import json
import sys

plain, packed = (json.load(open(p)) for p in sys.argv[1:3])
a, b = plain["ram"]["transferred"], packed["ram"]["transferred"]
z = packed.get("zstd", {})
print(f"without zstd: {a:>11,} bytes sent, verified={plain['verified']}")
print(f"with zstd:    {b:>11,} bytes sent, verified={packed['verified']}  "
      f"({100 * (a - b) / a:.0f}% less; {z.get('pages', 0)} pages compressed, ratio {z.get('compression-ratio')}, "
      f"ram encoded-pages {packed['ram']['encoded-pages']})")
sys.exit(0 if plain["verified"] and packed["verified"] and b < a and z.get("pages", 0) > 0 else 1)
