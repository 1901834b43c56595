"""Large photos in the shapes that cost a decoder the most memory, for the decode-memory
test and benchmark: 4096 x 4096 (the pixel cap) from scikit-image's astronaut photo, as a
progressive 4:4:4 CMYK JPEG (Pillow writes Adobe CMYK), a progressive 4:4:4 RGB JPEG, a
baseline 4:2:0 RGB JPEG and an RGBA PNG. Usage: make_large_images.py SKIMAGE_DIR OUT_DIR
"""
import os
import sys

from PIL import Image

src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
base = Image.open(os.path.join(src, "astronaut.png")).convert("RGB").resize((4096, 4096), Image.BICUBIC)
files = {
    "cmyk-progressive-444-4096.jpg": lambda f: base.convert("CMYK").save(
        f, "JPEG", progressive=True, quality=90, subsampling=0),
    "rgb-progressive-444-4096.jpg": lambda f: base.save(
        f, "JPEG", progressive=True, quality=90, subsampling=0),
    "rgb-baseline-420-4096.jpg": lambda f: base.save(f, "JPEG", quality=90, subsampling=2),
    "rgba-4096.png": lambda f: base.convert("RGBA").save(f, "PNG", compress_level=9),
    # An ordinary phone-sized photo, baseline and progressive, for embedding agreement.
    "rgb-baseline-1600.jpg": lambda f: base.resize((1600, 1200), Image.BICUBIC).save(
        f, "JPEG", quality=88),
    "rgb-progressive-1600.jpg": lambda f: base.resize((1600, 1200), Image.BICUBIC).save(
        f, "JPEG", quality=88, progressive=True),
    # The other accepted formats, and a rotated progressive JPEG, at 2048 px.
    "rgb-2048.webp": lambda f: base.resize((2048, 2048)).save(f, "WEBP", quality=85),
    "rgba-2048-lossless.webp": lambda f: base.resize((2048, 2048)).convert("RGBA").save(
        f, "WEBP", lossless=True),
    "2048.gif": lambda f: base.resize((2048, 2048)).save(f, "GIF"),
    "2048.bmp": lambda f: base.resize((2048, 2048)).save(f, "BMP"),
    "gray16-2048.png": lambda f: base.resize((2048, 2048)).convert("I;16").save(f, "PNG"),
    "rotated-progressive-2048.jpg": lambda f: base.resize((2048, 1536)).save(
        f, "JPEG", progressive=True, quality=88, exif=rotated_exif()),
}


def rotated_exif():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return exif.tobytes()


for name, write in files.items():
    path = os.path.join(out, name)
    if os.path.exists(path):
        continue
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
