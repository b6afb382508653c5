"""Verifies signatures with Stripe's own library, so the tests do not merely agree
with themselves. Reads JSON lines {"secret", "header", "payload"} on stdin; prints
"ok" or the error for each."""
import json
import sys

import stripe

for line in sys.stdin:
    case = json.loads(line)
    try:
        stripe.WebhookSignature.verify_header(
            case["payload"], case["header"], case["secret"], tolerance=300
        )
        print("ok", flush=True)
    except Exception as e:  # each case's verdict, whatever the error
        print(f"refused: {e}", flush=True)
