#!/usr/bin/env python3
"""Seeds a demo catalogue for `make run`: real photos served over HTTP, and product
documents shaped like the shop's mongoose documents (see the "Result shape" in the
contract), including the fields the service must not return.

Run with the venv python (`.tools/venv/bin/python`, it has pymongo):

    scripts/seed_demo.py --uri mongodb://127.0.0.1:27017/?directConnection=true \
        --image-base-url http://127.0.0.1:8002

Idempotent: products are matched by name. A missing product is inserted; an existing
one is updated (and its `updatedAt` bumped) only when a seeded field differs, e.g. the
image URL after a port change. Products not in the list are never touched.
"""

import argparse
import datetime as dt
import os
import shutil
import sys

import pymongo
from bson import ObjectId

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fixed ids so that reruns and other tools see the same categories.
CATEGORIES = {
    "Kitchen": ObjectId("65a1e9000000000000000001"),
    "Decor": ObjectId("65a1e9000000000000000002"),
    "Posters": ObjectId("65a1e9000000000000000003"),
    "Collectibles": ObjectId("65a1e9000000000000000004"),
    "Garden": ObjectId("65a1e9000000000000000005"),
}

# (name, photo in .tools/data/skimage, category, price, size, description, rating, ratings)
# Photographs only (no synthetic test patterns); two motorcycle shots of the same bike make
# a near-duplicate pair, and the horse is an RGBA silhouette.
PRODUCTS = [
    ("Espresso cup", "coffee.png", "Kitchen", 120000, 8, "Porcelain espresso cup with saucer.", 4.6, 31),
    ("Cat figurine", "chelsea.png", "Decor", 250000, 15, "Hand-painted tabby cat figurine.", 4.8, 12),
    ("Motorbike model (left)", "motorcycle_left.png", "Collectibles", 890000, 30, "1:12 scale motorbike model.", 4.3, 7),
    ("Motorbike model (right)", "motorcycle_right.png", "Collectibles", 890000, 30, "The same model, other side.", 4.1, 3),
    ("Rocket launch print", "rocket.jpg", "Posters", 180000, 40, "Photo print of a rocket on the launch pad.", 4.5, 9),
    ("Astronaut poster", "astronaut.png", "Posters", 210000, 50, "Portrait of an astronaut in a spacesuit.", 4.7, 22),
    ("Deep field poster", "hubble_deep_field.jpg", "Posters", 230000, 50, "Thousands of galaxies in one frame.", 4.9, 18),
    ("Full moon print", "moon.png", "Posters", 150000, 30, "Black and white print of the moon.", 4.0, 5),
    ("Vintage camera print", "camera.png", "Posters", 160000, 30, "Black and white street photography print.", 3.9, 4),
    ("Coin collection", "coins.png", "Collectibles", 540000, 20, "A tray of old coins.", 4.2, 6),
    ("Horse wall sticker", "horse.png", "Decor", 90000, 60, "Horse silhouette sticker, transparent background.", 4.4, 11),
    ("Brick wall tile", "brick.png", "Decor", 70000, 25, "Brick-pattern wall tile.", 3.8, 2),
    ("Lawn seed mix", "grass.png", "Garden", 95000, 10, "Fast-growing lawn seed.", 4.1, 14),
    ("Garden gravel", "gravel.png", "Garden", 60000, 20, "Decorative gravel, 5 kg bag.", 4.0, 8),
]

# Not searchable: no photo (the service must skip products without `productImage`).
NO_IMAGE = ("Gift card", "Kitchen", 500000, 0, "A gift card for the whole shop.", 5.0, 40)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--uri", default=os.environ.get("MONGO_URI", "mongodb://127.0.0.1:27017/?directConnection=true"))
    ap.add_argument("--db", default=os.environ.get("MONGO_DB_NAME", "test"))
    ap.add_argument("--collection", default=os.environ.get("MONGO_COLLECTION", "products"))
    ap.add_argument("--photos", default=os.path.join(ROOT, ".tools/data/skimage"), help="where `make setup` put the photos")
    ap.add_argument("--images-dir", default=os.path.join(ROOT, ".tools/run/images"), help="directory served over HTTP")
    ap.add_argument("--image-base-url", default="http://127.0.0.1:8002", help="URL at which --images-dir is served")
    args = ap.parse_args()

    copy_photos(args.photos, args.images_dir)

    client = pymongo.MongoClient(args.uri, serverSelectionTimeoutMS=5000)
    db = client[args.db]
    for name, oid in CATEGORIES.items():
        db.categories.update_one({"_id": oid}, {"$setOnInsert": {"categoryName": name}}, upsert=True)

    base = args.image_base_url.rstrip("/")
    docs = [
        product(name, f"{base}/{photo}", cat, price, size, desc, rating, n)
        for name, photo, cat, price, size, desc, rating, n in PRODUCTS
    ]
    name, cat, price, size, desc, rating, n = NO_IMAGE
    docs.append(product(name, "", cat, price, size, desc, rating, n))

    coll = db[args.collection]
    counts = {"inserted": 0, "updated": 0, "unchanged": 0}
    for doc in docs:
        counts[upsert(coll, doc)] += 1
    searchable = coll.count_documents({"productImage": {"$type": "string", "$ne": ""}})
    print(
        f"[seed] {args.db}.{args.collection}: {counts['inserted']} inserted, {counts['updated']} updated, "
        f"{counts['unchanged']} unchanged; {searchable} products with an image; photos in {args.images_dir}"
    )
    return 0


def copy_photos(src: str, dest: str) -> None:
    """Copies the product photos as they are (PNG/JPEG: both formats a shop serves)."""
    os.makedirs(dest, exist_ok=True)
    for _, photo, *_ in PRODUCTS:
        s, d = os.path.join(src, photo), os.path.join(dest, photo)
        if not os.path.isfile(s):
            sys.exit(f"[seed] {s} missing: run `make setup`")
        if not os.path.isfile(d) or os.path.getsize(d) != os.path.getsize(s):
            shutil.copyfile(s, d)


def product(name, image, category, price, size, description, rating, ratings) -> dict:
    """The seeded fields of one product, as the shop's backend stores them."""
    return {
        "productName": name,
        "productPrice": price,
        "productImage": image,
        "productCategory": CATEGORIES[category],
        "productSize": size,
        "productDescription": description,
        "averageRating": rating,
        "totalRatings": ratings,
        # Stored by the shop, never returned by the search service.
        "productQuantity": 100,
        "productDiscount": 0,
        "isHidden": False,
    }


def upsert(coll, doc: dict) -> str:
    """Inserts or updates one product by name; says which it did."""
    # mongoose timestamps are millisecond BSON dates.
    now = dt.datetime.now(dt.timezone.utc)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    current = coll.find_one({"productName": doc["productName"]})
    if current is None:
        coll.insert_one({**doc, "createdAt": now, "updatedAt": now, "__v": 0})
        return "inserted"
    changed = {k: v for k, v in doc.items() if current.get(k) != v}
    if not changed:
        return "unchanged"
    coll.update_one({"_id": current["_id"]}, {"$set": {**changed, "updatedAt": now}})
    return "updated"


if __name__ == "__main__":
    sys.exit(main())
