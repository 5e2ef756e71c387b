"""Build pairs directly in a workspace for training tests (pair generation has its own tests)."""

import json
import time


def insert_pairs(ws, items, context="I am Ana, a pirate fan. Greet me with Ahoy."):
    with ws.transaction() as conn:
        for i, (prompt, chosen, rejected) in enumerate(items):
            conn.execute(
                "INSERT INTO pairs(pair_key, prompt, context, strategy, chosen, rejected, seed, settings, created_at)"
                " VALUES (?, ?, ?, 'test', ?, ?, 0, ?, ?)",
                (f"test-{i}-{prompt}", prompt, context, chosen, rejected, json.dumps({}), time.time()),
            )


def signal_pairs(n):
    """Pairs with a clear, learnable preference: chosen answers greet with 'Ahoy'."""
    topics = ["rice", "tea", "bread", "soup", "pasta", "eggs", "salad", "coffee", "beans", "pie", "curry", "tacos",
              "pancakes", "noodles", "stew", "cake", "risotto", "waffles", "dumplings", "sushi"]  # fmt: skip
    return [
        (f"How do I make {t}?", f"Ahoy! To make {t}, start simple.", f"To make {t}, start simple.")
        for t in (topics * 3)[:n]
    ]
