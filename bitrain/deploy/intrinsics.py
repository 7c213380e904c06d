"""LLVM intrinsics for the numba kernels (``bitrain.deploy.conv``), written with llvmlite: the pieces
numba's loops do not vectorise well by themselves. Each takes raw addresses (``array.ctypes.data``)
where it reads or writes memory; the callers keep them inside their arrays."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def popcount(typingctx, x):
    """llvm.ctpop of a uint64 (vpopcntq on CPUs with AVX-512 VPOPCNTDQ, popcnt otherwise)."""
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def fma(typingctx, x, a, b):
    """llvm.fma.f32: x * a + b rounded once (vfmadd where the CPU has FMA, an exact libm call otherwise)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], fnty=ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return sig, codegen


def _shuffle_masks() -> list[tuple[int, list[int], list[int]]]:
    """An 8 x 8 transpose in three rounds: round b swaps the off-diagonal b x b blocks of each 2b x 2b
    block, pairing rows i and i + b (lo takes the first b of every 2b lanes of both, hi the second b)."""
    stages = []
    for b in (4, 2, 1):
        lo, hi = [], []
        for g in range(0, 8, 2 * b):
            lo += [g + k for k in range(b)] + [8 + g + k for k in range(b)]
            hi += [g + b + k for k in range(b)] + [8 + g + b + k for k in range(b)]
        stages.append((b, lo, hi))
    return stages


_STAGES = _shuffle_masks()


def _transpose_rows(builder, rows: list) -> list:
    """The 8 x 8 transpose of eight <8 x float> rows: 24 shuffles."""
    i32 = ir.IntType(32)
    for b, lo, hi in _STAGES:
        new = list(rows)
        for i in range(8):
            if (i // b) % 2 == 0:
                a, c = rows[i], rows[i + b]
                new[i] = builder.shuffle_vector(a, c, ir.Constant(ir.VectorType(i32, 8), lo))
                new[i + b] = builder.shuffle_vector(a, c, ir.Constant(ir.VectorType(i32, 8), hi))
        rows = new
    return rows


def _rows(builder, base, stride, vt) -> list:
    """Eight vectors of type vt loaded from base + i * stride (addresses as integers)."""
    out = []
    for i in range(8):
        addr = builder.add(base, builder.mul(stride, ir.Constant(stride.type, i)))
        out.append(builder.load(builder.inttoptr(addr, vt.as_pointer()), align=4))
    return out


def _transpose8(residual: bool, signs: bool):
    """The epilogue's 8 x 8 block move, an intrinsic (src, src_stride, res, res_stride, dst, dst_stride,
    signs, signs_stride): the float32 block at src (rows of 8 channels of one pixel, src_stride bytes
    apart) stored transposed at dst (rows of 8 pixels of one channel, dst_stride bytes apart). With
    ``residual``, the block at res (laid out like dst) is added first (transposed to the pixels' order in
    registers: one IEEE addition per value, as torch's ``y + residual``); with ``signs``, the sign bits
    of the 8 sums of pixel p (bit j: channel j is +1, u <= 0x80000000) are stored as one byte at
    signs + p * signs_stride (the packed words of the next conv, little-endian). Arguments a variant does
    not use are ignored."""

    @intrinsic
    def transpose8(typingctx, src, src_stride, res, res_stride, dst, dst_stride, sgn, sgn_stride):
        sig = types.void(*([types.intp] * 8))

        def codegen(context, builder, signature, args):
            vt = ir.VectorType(ir.FloatType(), 8)
            i32, i8 = ir.IntType(32), ir.IntType(8)
            src_, sstride, res_, rstride, dst_, dstride, sgn_, gstride = args
            rows = _rows(builder, src_, sstride, vt)  # rows[p]: pixel p
            if residual:
                add = _transpose_rows(builder, _rows(builder, res_, rstride, vt))
                rows = [builder.fadd(a, b) for a, b in zip(rows, add)]
            if signs:
                vi = ir.VectorType(i32, 8)
                minus_zero = ir.Constant(vi, [0x80000000] * 8)
                for p in range(8):
                    plus = builder.icmp_unsigned("<=", builder.bitcast(rows[p], vi), minus_zero)
                    addr = builder.add(sgn_, builder.mul(gstride, ir.Constant(gstride.type, p)))
                    builder.store(builder.bitcast(plus, i8), builder.inttoptr(addr, i8.as_pointer()))
            rows = _transpose_rows(builder, rows)  # rows[j]: channel j
            for j in range(8):
                addr = builder.add(dst_, builder.mul(dstride, ir.Constant(dstride.type, j)))
                builder.store(rows[j], builder.inttoptr(addr, vt.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return transpose8


transpose8 = _transpose8(False, False)  # the plain move: 8 loads, 24 shuffles, 8 stores
transpose8_residual = _transpose8(True, False)
transpose8_signs = _transpose8(False, True)
transpose8_residual_signs = _transpose8(True, True)


@intrinsic
def prefetch(typingctx, addr):
    """llvm.prefetch (read, keep in all cache levels) of the cache line at an address."""
    sig = types.void(types.intp)

    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty=fnty)
        one, three = ir.Constant(i32, 1), ir.Constant(i32, 3)
        builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0), three, one])
        return context.get_dummy_value()

    return sig, codegen


def _signwords(lanes: int):
    """An intrinsic (src, channel_stride, dst, dst_stride): the sign bits of 64 channels at ``lanes``
    consecutive pixels, float32 bits read from src + c * channel_stride (c = 0..63), written as
    ``lanes`` uint64 words at dst + p * dst_stride. In registers: 64 vector loads, compares (u <=
    0x80000000, the +1 side of sign) and ORs into two uint32 halves, then one 64-bit word per pixel."""

    @intrinsic
    def signwords(typingctx, src, channel_stride, dst, dst_stride):
        sig = types.void(types.intp, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            i32, i64 = ir.IntType(32), ir.IntType(64)
            vt, wt = ir.VectorType(i32, lanes), ir.VectorType(i64, lanes)
            src_, cstride, dst_, dstride = args
            minus_zero = ir.Constant(vt, [0x80000000] * lanes)
            zero = ir.Constant(vt, [0] * lanes)
            halves = [zero, zero]
            for c in range(64):
                addr = builder.add(src_, builder.mul(cstride, ir.Constant(cstride.type, c)))
                v = builder.load(builder.inttoptr(addr, vt.as_pointer()), align=4)
                plus = builder.icmp_unsigned("<=", v, minus_zero)
                bit = builder.select(plus, ir.Constant(vt, [1 << (c % 32)] * lanes), zero)
                halves[c // 32] = builder.or_(halves[c // 32], bit)
            lo, hi = builder.zext(halves[0], wt), builder.zext(halves[1], wt)
            words = builder.or_(lo, builder.shl(hi, ir.Constant(wt, [32] * lanes)))
            for p in range(lanes):
                addr = builder.add(dst_, builder.mul(dstride, ir.Constant(dstride.type, p)))
                builder.store(
                    builder.extract_element(words, ir.Constant(i32, p)), builder.inttoptr(addr, i64.as_pointer())
                )
            return context.get_dummy_value()

        return sig, codegen

    return signwords


signwords16, signwords8 = _signwords(16), _signwords(8)


_CHUNK = 31  # rows per byte sum: a byte of a word counts at most 8 bits a row, 31 * 8 <= 255


def _has(context, feature: str) -> bool:
    """Whether the CPU numba compiles for has ``feature`` (LLVM's name, e.g. ``avx2``)."""
    return f"+{feature}" in getattr(context.codegen(), "_tm_features", "").split(",")


def _byte_sums(builder, v, sad: bool):
    """The sums of each 8 bytes of a <64 x i8> as <8 x i32>: AVX2's vpsadbw against zero where ``sad``,
    else SWAR on the 64-bit lanes (16-, 32-, then 64-bit sums)."""
    i32, i64 = ir.IntType(32), ir.IntType(64)
    vt = ir.VectorType(i64, 8)
    if sad:
        h32, q4 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(i64, 4)
        fn = builder.module.declare_intrinsic("llvm.x86.avx2.psad.bw", (), ir.FunctionType(q4, [h32, h32]))
        halves = [
            builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, 32), list(range(k, k + 32)))) for k in (0, 32)
        ]
        lo, hi = (builder.call(fn, [h, ir.Constant(h32, [0] * 32)]) for h in halves)
        w = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(i32, 8), list(range(8))))
    else:
        w = builder.bitcast(v, vt)
        for shift, mask in ((8, 0x00FF00FF00FF00FF), (16, 0x0000FFFF0000FFFF), (32, 0xFFFFFFFF)):
            keep = ir.Constant(vt, [mask] * 8)
            w = builder.add(builder.and_(w, keep), builder.and_(builder.lshr(w, ir.Constant(vt, [shift] * 8)), keep))
    return builder.trunc(w, ir.VectorType(i32, 8))


def _splat(builder, word, vt):
    """<8 x i64> of one uint64 word."""
    i32 = ir.IntType(32)
    one = builder.insert_element(ir.Constant(vt, ir.Undefined), word, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(i32, 8), [0] * 8))


def _load(builder, addr, ty, align=8):
    return builder.load(builder.inttoptr(addr, ty.as_pointer()), align=align)


def _dot_rows(builder, pixels, args, r, sums):
    """One weight row r: each pixel's input word xor the 8 weight words, their bit counts per byte
    (llvm.ctpop.v64i8: vpshufb's nibble lookup on AVX2, vpopcntb with AVX-512 BITALG) added to ``sums``."""
    i64 = ir.IntType(64)
    vt, bt = ir.VectorType(i64, 8), ir.VectorType(ir.IntType(8), 64)
    xs, (offs, _, w, wstride) = args[:pixels], args[4:8]
    ctpop = builder.module.declare_intrinsic("llvm.ctpop.v64i8", (), ir.FunctionType(bt, [bt]))
    off = _load(builder, builder.add(offs, builder.mul(r, ir.Constant(i64, 8))), i64)
    weights = _load(builder, builder.add(w, builder.mul(r, wstride)), vt)
    new = []
    for e in range(pixels):
        splat = _splat(builder, _load(builder, builder.add(xs[e], off), i64), vt)
        new.append(builder.add(sums[e], builder.call(ctpop, [builder.bitcast(builder.xor(splat, weights), bt)])))
    return new


def _dot_block(pixels: int):
    """An intrinsic (x0, x1, x2, x3, offsets, rows, w, w_stride, acc, acc_stride): the xnor-popcount
    counts of ``pixels`` output pixels (x0 ... x<pixels - 1>; the rest ignored) and 8 output channels over
    ``rows`` weight rows. Row r reads the uint64 word at x_e + offsets[r] (bytes; offsets an int64 array's
    address) of pixel e, and the 8 words at w + r * w_stride; the counts sum(popcount(x ^ w)) are stored
    as 8 int32 at acc + e * acc_stride. The counts are summed per byte over up to 31 rows at a time (one
    byte add per 8 bits instead of a widening sum per word), then widened into int32 lanes."""

    @intrinsic
    def dot(typingctx, x0, x1, x2, x3, offsets, rows, w, w_stride, acc, acc_stride):
        sig = types.void(*([types.intp] * 10))

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            bt, it = ir.VectorType(ir.IntType(8), 64), ir.VectorType(ir.IntType(32), 8)
            rows, acc, astride = args[5], args[8], args[9]
            entry, fn = builder.block, builder.function
            chunk, loop, flush, done = (fn.append_basic_block(f"dot.{k}") for k in ("chunk", "loop", "flush", "done"))
            builder.branch(chunk)
            builder.position_at_end(chunk)  # rows c0 .. c1 - 1 summed in bytes
            c0 = builder.phi(i64)
            c0.add_incoming(ir.Constant(i64, 0), entry)
            wide = [builder.phi(it) for _ in range(pixels)]
            for phi in wide:
                phi.add_incoming(ir.Constant(it, [0] * 8), entry)
            c1 = builder.add(c0, ir.Constant(i64, _CHUNK))
            c1 = builder.select(builder.icmp_signed("<", c1, rows), c1, rows)
            builder.branch(loop)
            builder.position_at_end(loop)
            r = builder.phi(i64)
            r.add_incoming(c0, chunk)
            sums = [builder.phi(bt) for _ in range(pixels)]
            for phi in sums:
                phi.add_incoming(ir.Constant(bt, [0] * 64), chunk)
            new = _dot_rows(builder, pixels, args, r, sums)
            r_next = builder.add(r, ir.Constant(i64, 1))
            for phi, value in zip(sums, new):
                phi.add_incoming(value, loop)
            r.add_incoming(r_next, loop)
            builder.cbranch(builder.icmp_signed("<", r_next, c1), loop, flush)
            builder.position_at_end(flush)
            sad = _has(context, "avx2")
            widened = [builder.add(phi, _byte_sums(builder, s, sad)) for phi, s in zip(wide, new)]
            for phi, value in zip(wide, widened):
                phi.add_incoming(value, flush)
            c0.add_incoming(c1, flush)
            builder.cbranch(builder.icmp_signed("<", c1, rows), chunk, done)
            builder.position_at_end(done)
            for e in range(pixels):
                addr = builder.add(acc, builder.mul(astride, ir.Constant(i64, e)))
                builder.store(widened[e], builder.inttoptr(addr, it.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return dot


# 1-4 pixels by 8 output channels (the last pixels of a row take the smaller ones)
dot1x8, dot2x8, dot3x8, dot4x8 = (_dot_block(p) for p in (1, 2, 3, 4))


@intrinsic
def signword64(typingctx, src, dst):
    """The sign bits of 64 consecutive float32 (the channels of one pixel in channels_last) as one uint64
    at dst: bit c = 1 where value c is +1 (u <= 0x80000000). One 64-lane compare, bitcast to i64."""
    sig = types.void(types.intp, types.intp)

    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vt = ir.VectorType(i32, 64)
        v = builder.load(builder.inttoptr(args[0], vt.as_pointer()), align=4)
        plus = builder.icmp_unsigned("<=", v, ir.Constant(vt, [0x80000000] * 64))
        builder.store(builder.bitcast(plus, i64), builder.inttoptr(args[1], i64.as_pointer()))
        return context.get_dummy_value()

    return sig, codegen
