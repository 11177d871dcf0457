"""Structured output by printing a marker block (the other way is the last expression's value).

    code-interpreter-mcp run examples/sentinel_json.py --schema examples/stats.schema.json
"""

import json
import statistics

values = [3, 1, 4, 1, 5, 9, 2, 6]
print("computing stats for", len(values), "values")
print("===BEGIN_JSON===")
print(json.dumps({"mean": statistics.mean(values), "median": statistics.median(values), "n": len(values)}))
print("===END_JSON===")
