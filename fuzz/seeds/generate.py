"""Regenerates the fuzzer's seed corpus (run once; the outputs are committed).

Tiny valid images of every supported format and variant, written by Pillow (libjpeg,
libpng, libwebp), plus truncated copies and oversized headers. Files named `regress-*`
are inputs the fuzzer once found slow or crashing; they stay. Needs Pillow in a throwaway
venv and scikit-image's photos from `make setup`:

    python3 -m venv /tmp/pil && /tmp/pil/bin/pip install Pillow
    /tmp/pil/bin/python fuzz/seeds/generate.py
"""

import io
import os
import struct
import zlib

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "decode")
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
SK = os.path.join(ROOT, ".tools", "data", "skimage")

os.makedirs(OUT, exist_ok=True)
for f in os.listdir(OUT):
    if not f.startswith("regress-"):  # inputs the fuzzer found: kept as they are
        os.remove(os.path.join(OUT, f))

img = Image.open(os.path.join(SK, "chelsea.png")).convert("RGB").resize((24, 16), Image.LANCZOS)
img.info.clear()
other = Image.open(os.path.join(SK, "coffee.png")).convert("RGB").resize((24, 16), Image.LANCZOS)
rgba = img.convert("RGBA")
rgba.putalpha(Image.linear_gradient("L").resize((24, 16)))

seeds = {}


def save(name, im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    seeds[name] = b.getvalue()


exif = Image.Exif()
exif[0x0112] = 6
save("baseline.jpg", img, "JPEG", quality=75)
save("progressive.jpg", img, "JPEG", quality=75, progressive=True)
save("cmyk.jpg", img.convert("CMYK"), "JPEG", quality=75)
save("gray.jpg", img.convert("L"), "JPEG", quality=75)
save("444.jpg", img, "JPEG", quality=75, subsampling=0)
save("restart.jpg", img, "JPEG", quality=75, restart_marker_blocks=1)
save("exif6.jpg", img.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=75, exif=exif)
save("rgb.png", img, "PNG")
save("rgba.png", rgba, "PNG")
save("palette.png", img.quantize(16), "PNG")
save("gray16.png", img.convert("I;16"), "PNG")
save("gray-alpha.png", rgba.convert("LA"), "PNG")
save("exif6.png", img.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)
save("lossy.webp", img, "WEBP", quality=50)
save("lossless.webp", img, "WEBP", lossless=True)
save("alpha.webp", rgba, "WEBP", quality=50)
save("animated.webp", img, "WEBP", save_all=True, append_images=[other], duration=50, quality=50)
save("animated.gif", img.quantize(16), "GIF", save_all=True, append_images=[other.quantize(16)],
     duration=50, loop=0)
save("transparent.gif", img.quantize(15), "GIF", transparency=0)
save("rgb24.bmp", img, "BMP")
save("rgba32.bmp", rgba, "BMP")
save("palette8.bmp", img.quantize(16), "BMP")

# Truncated copies.
for name in ["baseline.jpg", "progressive.jpg", "rgb.png", "lossy.webp", "lossless.webp",
             "animated.gif", "rgb24.bmp"]:
    b = seeds[name]
    stem, ext = name.rsplit(".", 1)
    seeds[f"{stem}-cut.{ext}"] = b[: len(b) * 2 // 3]

# Headers declaring far more pixels than the cap.
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


seeds["huge.png"] = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
j = bytearray(seeds["baseline.jpg"])
i = j.index(b"\xff\xc0")
j[i + 5:i + 9] = struct.pack(">HH", 60000, 60000)
seeds["huge.jpg"] = bytes(j)
g = bytearray(seeds["animated.gif"])
g[6:10] = struct.pack("<HH", 60000, 60000)
seeds["huge.gif"] = bytes(g)

for name, b in sorted(seeds.items()):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(b)
    print(f"{len(b):>6}  {name}")
print(sum(len(b) for b in seeds.values()), "bytes in", len(seeds), "seeds")
