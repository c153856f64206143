//! TCP sequence number arithmetic (RFC 1982 style, modulo 2^32).

#[inline]
pub(crate) fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}
#[inline]
pub(crate) fn le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}
#[inline]
pub(crate) fn gt(a: u32, b: u32) -> bool {
    lt(b, a)
}
#[inline]
pub(crate) fn ge(a: u32, b: u32) -> bool {
    le(b, a)
}
#[inline]
pub(crate) fn max(a: u32, b: u32) -> u32 {
    if lt(a, b) {
        b
    } else {
        a
    }
}
#[inline]
pub(crate) fn min(a: u32, b: u32) -> u32 {
    if lt(a, b) {
        a
    } else {
        b
    }
}
/// `b - a` if `b >= a`, else 0.
#[inline]
pub(crate) fn dist(a: u32, b: u32) -> u32 {
    if le(a, b) {
        b.wrapping_sub(a)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn wraps() {
        assert!(lt(u32::MAX - 5, 3));
        assert!(gt(3, u32::MAX - 5));
        assert_eq!(dist(u32::MAX - 1, 2), 4);
        assert_eq!(dist(2, u32::MAX - 1), 0);
        assert_eq!(max(u32::MAX, 1), 1);
        assert_eq!(min(u32::MAX, 1), u32::MAX);
    }
}
