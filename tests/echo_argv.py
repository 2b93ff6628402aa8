"""Stand-in program: prints its argv (after the program name) as one JSON line."""
import json
import sys

print("ARGV=" + json.dumps(sys.argv[1:]), flush=True)
