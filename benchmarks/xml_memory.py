"""What a parsed document costs in memory, by kind of node, against the parser's estimate (tree_cost).

    python benchmarks/xml_memory.py [--nodes N]

Each shape is parsed in a fresh process (so one does not reuse another's freed memory); the growth of
its resident memory, divided by the nodes of the tree, is what gateway/stages/xmlparse.py's NODE_BYTES
and ATTRIBUTE_BYTES must stay above, and tree_cost / growth above 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PROBE = """
import json, sys
from lxml import etree
from gateway.stages.xmlparse import tree_cost
shape, n = sys.argv[1], int(sys.argv[2])
per = 256
names = b" ".join(b'a%d=""' % i for i in range(per))
body = {
    "empty elements": b"<r>" + b"<a/>" * n + b"</r>",
    "elements with text": b"<r>" + b"<a>1</a>" * n + b"</r>",
    "pretty-printed elements": b"<r>" + b"<a>1</a>\\n  " * n + b"</r>",
    "attributes": b"<r>" + (b"<e " + names + b"/>") * (n // per) + b"</r>",
    "namespace declarations": b"<r>" + b"".join(b'<a xmlns:p%d="u%d"/>' % (i, i) for i in range(n)) + b"</r>",
}[shape]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
root = etree.fromstring(body, etree.XMLParser(huge_tree=True))
grown = rss() - before
print(json.dumps({"bytes": len(body), "grown": grown, "estimate": tree_cost(body)}))
"""

SHAPES = ["empty elements", "elements with text", "pretty-printed elements", "attributes", "namespace declarations"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1_000_000, help="nodes of each shape (default 1,000,000)")
    args = parser.parse_args()
    print(f"{'shape':26} {'body MiB':>9} {'tree MiB':>9} {'x body':>7} {'estimate MiB':>13} {'estimate/tree':>14}")
    for shape in SHAPES:
        out = subprocess.run([sys.executable, "-c", PROBE, shape, str(args.nodes)], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout)
        mib = 1024 * 1024
        print(f"{shape:26} {r['bytes'] / mib:9.1f} {r['grown'] / mib:9.1f} {r['grown'] / r['bytes']:7.1f} "
              f"{r['estimate'] / mib:13.1f} {r['estimate'] / r['grown']:14.2f}")


if __name__ == "__main__":
    main()
