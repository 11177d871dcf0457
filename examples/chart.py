"""Quick-start example: make a small data set, save it as CSV, draw a chart, and summarise it.

    code-interpreter-mcp run examples/chart.py --out ./out
"""

import csv
import math

import matplotlib.pyplot as plt

months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
sales = [round(1000 + 400 * math.sin(i / 2) + 35 * i) for i in range(12)]

with open("sales.csv", "w", newline="") as fh:
    writer = csv.writer(fh)
    writer.writerow(["month", "amount"])
    writer.writerows(zip(months, sales, strict=True))

fig, ax = plt.subplots(figsize=(7, 4))
ax.bar(months, sales, color="#4c72b0")
ax.set_title("Monthly sales")
ax.set_ylabel("amount")
fig.tight_layout()
fig.savefig("sales.png", dpi=100)
plt.close(fig)

print(f"total {sum(sales)}, best month {months[sales.index(max(sales))]}")
{"total": sum(sales), "best_month": months[sales.index(max(sales))], "months": len(sales)}
