//! SHA-256 digests as OCI writes them (`sha256:<64 lowercase hex>`), and readers/writers that
//! hash what passes through them. Only sha256 is accepted: it is what every OCI tool writes,
//! and a parsed digest is always safe to use as a file name.

use std::fmt;
use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A sha256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Parse `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Digest> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| Error::invalid(format!("unsupported digest {s:?} (want sha256:...)")))?;
        Digest::from_hex(hex).ok_or_else(|| Error::invalid(format!("malformed digest {s:?}")))
    }

    /// Parse 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Option<Digest> {
        let b = hex.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let val = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = val(b[2 * i])? << 4 | val(b[2 * i + 1])?;
        }
        Some(Digest(out))
    }

    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// The 64 hex digits (file names in the store).
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The first 12 hex digits, for tables.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A running sha256 plus a byte count.
#[derive(Clone, Default)]
pub struct Hasher {
    h: Sha256,
    pub bytes: u64,
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.h.update(data);
        self.bytes += data.len() as u64;
    }
    pub fn finish(self) -> Digest {
        Digest(self.h.finalize().into())
    }
}

/// Hashes everything read through it.
pub struct HashReader<R> {
    pub inner: R,
    pub hasher: Hasher,
}

impl<R: Read> HashReader<R> {
    pub fn new(inner: R) -> Self {
        HashReader {
            inner,
            hasher: Hasher::default(),
        }
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Hashes everything written through it.
pub struct HashWriter<W> {
    pub inner: W,
    pub hasher: Hasher,
}

impl<W: Write> HashWriter<W> {
    pub fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Hasher::default(),
        }
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let d = Digest::of(b"");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Digest::parse(&s).unwrap(), d);
        assert!(Digest::parse("sha512:00").is_err());
        assert!(Digest::parse(&s.to_uppercase()).is_err());
        assert!(Digest::parse("sha256:../../../../etc/passwd").is_err());
        assert!(Digest::parse(&s[..70]).is_err());
    }

    #[test]
    fn hashing_reader_and_writer_agree() {
        let mut w = HashWriter::new(Vec::new());
        w.write_all(b"hello").unwrap();
        let mut r = HashReader::new(&b"hello"[..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert_eq!(w.hasher.finish(), r.hasher.finish());
        assert_eq!(w.inner, b"hello");
    }
}
