//! The tar format, read and written by hand: ustar headers, PAX extended headers and GNU long
//! names on input; ustar plus PAX (only where a field does not fit) on output.
//!
//! Why not the `tar` crate: its reader buffers PAX and GNU long-name data without a bound and
//! its builder hides the byte layout we must control for canonical output. Here every header
//! byte is chosen explicitly, and every variable-size piece of input is bounded:
//!
//! * a PAX extended header (`x`) or GNU long name/link (`L`, `K`) larger than
//!   [`MAX_EXT_HEADER`] (1 MiB) is refused;
//! * a header block with a bad checksum, an unknown type flag, a GNU sparse or multi-volume
//!   entry, or an end of input before the end-of-archive block is refused ("truncated tar").
//!
//! Entry types that carry no data (links, symlinks, devices, directories, FIFOs) have none
//! whatever their size field says, as Go's `archive/tar` reads them: most image layers are
//! written by Go, and reading them the same way avoids two readers disagreeing about where the
//! next header starts.

use std::io::{self, Read, Write};

use crate::error::{Error, Result, ShowPath};

/// Tar block size.
pub const BLOCK: usize = 512;
/// Largest PAX extended header or GNU long name accepted (bytes of data).
pub const MAX_EXT_HEADER: u64 = 1 << 20;

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    HardLink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

impl Kind {
    fn flag(self) -> u8 {
        match self {
            Kind::File => b'0',
            Kind::HardLink => b'1',
            Kind::Symlink => b'2',
            Kind::Char => b'3',
            Kind::Block => b'4',
            Kind::Dir => b'5',
            Kind::Fifo => b'6',
        }
    }
}

/// Seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

/// One entry's metadata, with PAX and GNU extensions applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Name as stored (not yet validated: see [`super::path`]).
    pub path: Vec<u8>,
    pub kind: Option<Kind>,
    /// Target of a hard link or symlink.
    pub link: Vec<u8>,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Bytes of data that follow (0 for types without data).
    pub size: u64,
    pub mtime: Time,
    pub atime: Option<Time>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// `SCHILY.xattr.*` records, in the order found.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    pub fn kind(&self) -> Kind {
        self.kind.unwrap_or(Kind::File)
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::invalid(msg)
}

fn io_err(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        bad("truncated tar: input ended inside an entry")
    } else {
        Error::io("reading the layer", e)
    }
}

/// Parse a numeric header field: octal text, or base-256 when the top bit of the first byte
/// is set (GNU/star extension for values that do not fit).
fn parse_num(field: &[u8], what: &str) -> Result<u64> {
    let first = field.first().copied().unwrap_or(0);
    if first & 0x80 != 0 {
        if first & 0x40 != 0 {
            return Err(bad(format!("tar header: negative {what}")));
        }
        let mut v: u64 = (first & 0x3f) as u64;
        for &b in &field[1..] {
            if v >> 56 != 0 {
                return Err(bad(format!("tar header: {what} too large")));
            }
            v = (v << 8) | b as u64;
        }
        return Ok(v);
    }
    let mut v: u64 = 0;
    let mut digits = field
        .iter()
        .skip_while(|&&b| b == b' ' || b == 0)
        .take_while(|&&b| b != b' ' && b != 0)
        .peekable();
    if digits.peek().is_none() {
        return Ok(0);
    }
    for &b in digits {
        if !(b'0'..=b'7').contains(&b) {
            return Err(bad(format!("tar header: bad {what} field")));
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add((b - b'0') as u64))
            .ok_or_else(|| bad(format!("tar header: {what} too large")))?;
    }
    Ok(v)
}

/// Bytes of a NUL-terminated header text field.
fn cstr_field(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn checksum_ok(h: &[u8; BLOCK]) -> Result<bool> {
    let stored = parse_num(&h[148..156], "checksum")?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as u64;
        signed += (b as i8) as i64;
    }
    Ok(stored == unsigned || stored as i64 == signed)
}

/// A PAX time value `SECONDS[.FRACTION]`, possibly negative.
fn parse_pax_time(v: &[u8]) -> Option<Time> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let sec: i64 = int.parse().ok()?;
    let mut nsec: u32 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nsec += (b - b'0') as u32 * 10u32.pow(8 - i as u32);
    }
    Some(if !neg {
        Time { sec, nsec }
    } else if nsec == 0 {
        Time { sec: -sec, nsec: 0 }
    } else {
        Time {
            sec: -sec - 1,
            nsec: 1_000_000_000 - nsec,
        }
    })
}

/// Parse PAX records (`LEN KEY=VALUE\n`).
fn parse_pax(data: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        // Some writers pad the data with NULs.
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("bad PAX record: no length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad PAX record length"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad("bad PAX record length"));
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("bad PAX record: no '='"))?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

fn pax_num(key: &[u8], v: &[u8]) -> Result<u64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad PAX value for {}", ShowPath(key))))
}

/// Streaming tar reader: [`TarReader::next_entry`] then [`TarReader::read_data`] until it
/// returns 0; unread data is skipped at the next header.
pub struct TarReader<R: Read> {
    r: R,
    /// Data bytes of the current entry not read yet.
    remaining: u64,
    /// Padding after the current entry's data.
    pad: u64,
    ended: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(r: R) -> Self {
        TarReader {
            r,
            remaining: 0,
            pad: 0,
            ended: false,
        }
    }

    fn skip(&mut self, mut n: u64) -> Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            self.r.read_exact(&mut buf[..want]).map_err(io_err)?;
            n -= want as u64;
        }
        Ok(())
    }

    fn read_block(&mut self) -> Result<Option<[u8; BLOCK]>> {
        let mut h = [0u8; BLOCK];
        let mut got = 0;
        while got < BLOCK {
            match self.r.read(&mut h[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(bad("truncated tar: input ended inside a header")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(Some(h))
    }

    /// Data of an extension header (PAX or GNU long name), bounded.
    fn read_ext(&mut self, size: u64, what: &str) -> Result<Vec<u8>> {
        if size > MAX_EXT_HEADER {
            return Err(bad(format!(
                "{what} of {size} bytes exceeds the limit of {MAX_EXT_HEADER} bytes"
            )));
        }
        let mut data = vec![0u8; size as usize];
        self.r.read_exact(&mut data).map_err(io_err)?;
        self.skip(pad_of(size))?;
        Ok(data)
    }

    /// The next entry, or `None` after the end-of-archive block.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        if self.ended {
            return Ok(None);
        }
        self.skip(self.remaining + self.pad)?;
        self.remaining = 0;
        self.pad = 0;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let Some(h) = self.read_block()? else {
                return Err(bad("truncated tar: no end-of-archive block"));
            };
            if h.iter().all(|&b| b == 0) {
                self.ended = true;
                if !pax.is_empty() || long_name.is_some() || long_link.is_some() {
                    return Err(bad("tar: extended header without an entry"));
                }
                return Ok(None);
            }
            if !checksum_ok(&h)? {
                return Err(bad("tar header checksum mismatch (not a tar, or corrupt)"));
            }
            let flag = h[156];
            let size = parse_num(&h[124..136], "size")?;
            match flag {
                b'x' => {
                    let data = self.read_ext(size, "PAX header")?;
                    pax.extend(parse_pax(&data)?);
                    continue;
                }
                b'g' => {
                    // Global headers (e.g. git archive's comment) carry nothing we apply.
                    self.read_ext(size, "PAX global header")?;
                    continue;
                }
                b'L' => {
                    let data = self.read_ext(size, "GNU long name")?;
                    long_name = Some(cstr_field(&data).to_vec());
                    continue;
                }
                b'K' => {
                    let data = self.read_ext(size, "GNU long link name")?;
                    long_link = Some(cstr_field(&data).to_vec());
                    continue;
                }
                _ => {}
            }
            let kind = match flag {
                b'0' | 0 | b'7' => Kind::File,
                b'1' => Kind::HardLink,
                b'2' => Kind::Symlink,
                b'3' => Kind::Char,
                b'4' => Kind::Block,
                b'5' => Kind::Dir,
                b'6' => Kind::Fifo,
                b'S' => return Err(bad("GNU sparse tar entries are not supported")),
                other => {
                    return Err(bad(format!(
                        "unsupported tar entry type {:?}",
                        (other as char).escape_default().to_string()
                    )));
                }
            };
            let ustar = &h[257..263] == b"ustar\0";
            let mut path = Vec::new();
            if ustar {
                let prefix = cstr_field(&h[345..500]);
                if !prefix.is_empty() {
                    path.extend_from_slice(prefix);
                    path.push(b'/');
                }
            }
            path.extend_from_slice(cstr_field(&h[0..100]));
            let mut e = Entry {
                path,
                kind: Some(kind),
                link: cstr_field(&h[157..257]).to_vec(),
                mode: (parse_num(&h[100..108], "mode")? & 0o7777) as u32,
                uid: parse_num(&h[108..116], "uid")?,
                gid: parse_num(&h[116..124], "gid")?,
                size,
                mtime: Time {
                    sec: parse_num(&h[136..148], "mtime")? as i64,
                    nsec: 0,
                },
                atime: None,
                dev_major: parse_num(&h[329..337], "device major")? as u32,
                dev_minor: parse_num(&h[337..345], "device minor")? as u32,
                xattrs: Vec::new(),
            };
            if let Some(n) = long_name {
                e.path = n;
            }
            if let Some(l) = long_link {
                e.link = l;
            }
            for (k, v) in pax {
                match &k[..] {
                    b"path" => e.path = v,
                    b"linkpath" => e.link = v,
                    b"size" => e.size = pax_num(&k, &v)?,
                    b"uid" => e.uid = pax_num(&k, &v)?,
                    b"gid" => e.gid = pax_num(&k, &v)?,
                    b"mtime" => e.mtime = parse_pax_time(&v).ok_or_else(|| bad("bad PAX mtime"))?,
                    b"atime" => e.atime = parse_pax_time(&v),
                    _ if k.starts_with(b"GNU.sparse.") => {
                        return Err(bad("GNU sparse tar entries are not supported"));
                    }
                    _ => {
                        if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                            e.xattrs.retain(|(n, _)| n != name);
                            e.xattrs.push((name.to_vec(), v));
                        }
                    }
                }
            }
            if e.path.contains(&0) || e.link.contains(&0) {
                return Err(bad("tar entry name contains a NUL byte"));
            }
            if kind != Kind::File {
                e.size = 0;
            }
            self.remaining = e.size;
            self.pad = pad_of(e.size);
            return Ok(Some(e));
        }
    }

    /// Read the current entry's data; 0 at its end.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.remaining) as usize;
        let n = loop {
            match self.r.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        };
        if n == 0 {
            return Err(bad("truncated tar: input ended inside file data"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    /// After the end-of-archive block: read the rest of the input (more zero blocks, padding)
    /// so the whole stream is hashed, and return the inner reader.
    pub fn finish(mut self) -> Result<R> {
        let mut buf = [0u8; 8192];
        loop {
            match self.r.read(&mut buf) {
                Ok(0) => return Ok(self.r),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
    }
}

/// Padding after `size` bytes of data.
pub fn pad_of(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

// ---------------------------------------------------------------------------------------------
// Writing

/// What to write for one entry. `mtime` is whole seconds (canonical output drops sub-second
/// precision).
#[derive(Clone, Debug)]
pub struct HeaderSpec<'a> {
    pub path: &'a [u8],
    pub kind: Kind,
    pub link: &'a [u8],
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Sorted by name by the caller.
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

/// Write `v` as zero-padded octal into `field` (last byte NUL); false when it does not fit.
fn put_octal(field: &mut [u8], v: u64) -> bool {
    let digits = field.len() - 1;
    if digits < 22 && v >= 1u64 << (3 * digits) {
        return false;
    }
    let s = format!("{v:0digits$o}");
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    true
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // The length counts itself: find the fixed point.
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn finish_header(h: &mut [u8; BLOCK]) {
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| b as u64).sum();
    // Six octal digits, NUL, space: the traditional layout.
    let s = format!("{sum:06o}");
    h[148..154].copy_from_slice(s.as_bytes());
    h[154] = 0;
    h[155] = b' ';
}

fn base_header(flag: u8) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[156] = flag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h
}

/// Write one entry's header (a PAX header first when a value does not fit ustar) and return
/// the number of bytes written. The caller then writes `size` bytes of data and
/// [`write_padding`].
///
/// PAX is used only for: names or link targets over 100 bytes (no ustar prefix splitting, so
/// there is one rule), uid/gid/size/mtime outside the octal fields' range, and xattrs. The PAX
/// header itself has fixed metadata: name `PaxHeader`, mode 0644, ids 0, mtime 0.
pub fn write_header(w: &mut impl Write, spec: &HeaderSpec<'_>) -> io::Result<u64> {
    let mut h = base_header(spec.kind.flag());
    let mut pax: Vec<u8> = Vec::new();
    if spec.path.len() <= 100 {
        h[..spec.path.len()].copy_from_slice(spec.path);
    } else {
        pax_record(&mut pax, b"path", spec.path);
    }
    if spec.link.len() <= 100 {
        h[157..157 + spec.link.len()].copy_from_slice(spec.link);
    } else {
        pax_record(&mut pax, b"linkpath", spec.link);
    }
    put_octal(&mut h[100..108], (spec.mode & 0o7777) as u64);
    if !put_octal(&mut h[108..116], spec.uid) {
        put_octal(&mut h[108..116], 0);
        pax_record(&mut pax, b"uid", spec.uid.to_string().as_bytes());
    }
    if !put_octal(&mut h[116..124], spec.gid) {
        put_octal(&mut h[116..124], 0);
        pax_record(&mut pax, b"gid", spec.gid.to_string().as_bytes());
    }
    if !put_octal(&mut h[124..136], spec.size) {
        put_octal(&mut h[124..136], 0);
        pax_record(&mut pax, b"size", spec.size.to_string().as_bytes());
    }
    if spec.mtime < 0 || !put_octal(&mut h[136..148], spec.mtime as u64) {
        put_octal(&mut h[136..148], 0);
        pax_record(&mut pax, b"mtime", spec.mtime.to_string().as_bytes());
    }
    let is_dev = matches!(spec.kind, Kind::Char | Kind::Block);
    put_octal(
        &mut h[329..337],
        if is_dev { spec.dev_major as u64 } else { 0 },
    );
    put_octal(
        &mut h[337..345],
        if is_dev { spec.dev_minor as u64 } else { 0 },
    );
    for (name, value) in spec.xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(name);
        pax_record(&mut pax, &key, value);
    }
    let mut written = 0u64;
    if !pax.is_empty() {
        let mut ph = base_header(b'x');
        ph[..9].copy_from_slice(b"PaxHeader");
        put_octal(&mut ph[100..108], 0o644);
        put_octal(&mut ph[108..116], 0);
        put_octal(&mut ph[116..124], 0);
        put_octal(&mut ph[124..136], pax.len() as u64);
        put_octal(&mut ph[136..148], 0);
        put_octal(&mut ph[329..337], 0);
        put_octal(&mut ph[337..345], 0);
        finish_header(&mut ph);
        w.write_all(&ph)?;
        w.write_all(&pax)?;
        let pad = pad_of(pax.len() as u64) as usize;
        w.write_all(&[0u8; BLOCK][..pad])?;
        written += (BLOCK + pax.len() + pad) as u64;
    }
    finish_header(&mut h);
    w.write_all(&h)?;
    Ok(written + BLOCK as u64)
}

/// Zero padding after `size` bytes of data; returns the bytes written.
pub fn write_padding(w: &mut impl Write, size: u64) -> io::Result<u64> {
    let pad = pad_of(size) as usize;
    w.write_all(&[0u8; BLOCK][..pad])?;
    Ok(pad as u64)
}

/// The end-of-archive marker: two zero blocks.
pub fn write_trailer(w: &mut impl Write) -> io::Result<u64> {
    w.write_all(&[0u8; 2 * BLOCK])?;
    Ok(2 * BLOCK as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(path: &'a [u8], xattrs: &'a [(Vec<u8>, Vec<u8>)]) -> HeaderSpec<'a> {
        HeaderSpec {
            path,
            kind: Kind::File,
            link: b"",
            mode: 0o4755,
            uid: 1000,
            gid: 5_000_000,
            size: 3,
            mtime: 1_700_000_000,
            dev_major: 0,
            dev_minor: 0,
            xattrs,
        }
    }

    fn one_entry(s: &HeaderSpec<'_>, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out, s).unwrap();
        out.extend_from_slice(data);
        write_padding(&mut out, data.len() as u64).unwrap();
        write_trailer(&mut out).unwrap();
        out
    }

    #[test]
    fn roundtrip_with_pax_only_where_needed() {
        let x = [(b"user.a".to_vec(), b"v\n=1".to_vec())];
        let long = [b'n'; 150];
        for (path, xattrs, want_pax) in [
            (&b"short"[..], &[][..], true), // gid 5,000,000 does not fit 7 octal digits
            (&long[..], &x[..], true),
        ] {
            let s = spec(path, xattrs);
            let bytes = one_entry(&s, b"abc");
            assert_eq!(bytes[156] == b'x', want_pax);
            let mut r = TarReader::new(&bytes[..]);
            let e = r.next_entry().unwrap().unwrap();
            assert_eq!(e.path, path);
            assert_eq!(e.mode, 0o4755);
            assert_eq!((e.uid, e.gid, e.size), (1000, 5_000_000, 3));
            assert_eq!(e.mtime.sec, 1_700_000_000);
            assert_eq!(e.xattrs, xattrs);
            let mut buf = [0u8; 10];
            assert_eq!(r.read_data(&mut buf).unwrap(), 3);
            assert_eq!(&buf[..3], b"abc");
            assert!(r.next_entry().unwrap().is_none());
        }
        let mut s = spec(b"small", &[]);
        s.gid = 7;
        assert_ne!(one_entry(&s, b"abc")[156], b'x');
    }

    #[test]
    fn header_checksum_and_field_layout() {
        let s = HeaderSpec {
            path: b"a",
            kind: Kind::File,
            link: b"",
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            dev_major: 0,
            dev_minor: 0,
            xattrs: &[],
        };
        let mut out = Vec::new();
        write_header(&mut out, &s).unwrap();
        let h: [u8; BLOCK] = out[..BLOCK].try_into().unwrap();
        assert!(checksum_ok(&h).unwrap());
        assert_eq!(&h[100..108], b"0000644\0");
    }

    #[test]
    fn pax_record_length_counts_itself() {
        for vlen in [0usize, 1, 5, 89, 90, 91, 994, 995, 996, 9990] {
            let mut out = Vec::new();
            pax_record(&mut out, b"path", &vec![b'a'; vlen]);
            let recs = parse_pax(&out).unwrap();
            assert_eq!(recs.len(), 1, "vlen {vlen}");
            assert_eq!(recs[0].1.len(), vlen);
        }
    }

    #[test]
    fn refuses_oversized_pax_and_truncation() {
        let mut h = base_header(b'x');
        put_octal(&mut h[124..136], MAX_EXT_HEADER + 1);
        finish_header(&mut h);
        let mut bytes = h.to_vec();
        bytes.extend(vec![0u8; 4096]);
        let e = TarReader::new(&bytes[..]).next_entry().unwrap_err();
        assert!(e.to_string().contains("exceeds the limit"), "{e}");

        let full = one_entry(&spec(b"f", &[]), b"abc");
        for cut in [100, BLOCK, BLOCK + 2, full.len() - 2 * BLOCK] {
            let mut r = TarReader::new(&full[..cut]);
            let res = (|| -> Result<()> {
                while r.next_entry()?.is_some() {
                    let mut b = [0u8; 16];
                    while r.read_data(&mut b)? > 0 {}
                }
                Ok(())
            })();
            let msg = res.unwrap_err().to_string();
            assert!(msg.contains("truncated"), "cut {cut}: {msg}");
        }
    }

    #[test]
    fn numbers_and_times() {
        assert_eq!(parse_num(b"0000644\0", "m").unwrap(), 0o644);
        assert_eq!(parse_num(b"  644 \0", "m").unwrap(), 0o644);
        assert_eq!(parse_num(&[0x80, 0, 0, 0, 0, 0, 1, 0], "m").unwrap(), 256);
        assert!(parse_num(b"0009\0", "m").is_err());
        assert!(parse_num(&[0xff, 0xff], "m").is_err());
        assert_eq!(
            parse_pax_time(b"1.5"),
            Some(Time {
                sec: 1,
                nsec: 500_000_000
            })
        );
        assert_eq!(
            parse_pax_time(b"-1.25"),
            Some(Time {
                sec: -2,
                nsec: 750_000_000
            })
        );
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
