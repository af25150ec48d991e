//! A reader that checks what passes through it against a digest and a size: bytes beyond the
//! declared size are an error at once (a registry cannot make the node read forever), and the
//! digest is compared when the stream ends. No I/O of its own.

use crate::model::workload::Digest;
use sha2::{Digest as _, Sha256};
use std::io::{self, Read};

pub struct Verifying<R> {
    inner: R,
    hasher: Sha256,
    want: Digest,
    /// The size the descriptor gives; None when unknown (a manifest fetched by digest alone),
    /// then `max` bounds it.
    size: Option<u64>,
    max: u64,
    read: u64,
    checked: bool,
}

impl<R: Read> Verifying<R> {
    pub fn new(inner: R, want: Digest, size: Option<u64>, max: u64) -> Self {
        Verifying {
            inner,
            hasher: Sha256::new(),
            want,
            size,
            max,
            read: 0,
            checked: false,
        }
    }

    /// Bytes read so far.
    pub fn read_bytes(&self) -> u64 {
        self.read
    }

    /// Read to the end (discarding) and say whether the digest matched. A reader that was
    /// consumed by a decompressor may have trailing bytes: they count too.
    pub fn finish(mut self) -> io::Result<u64> {
        io::copy(&mut self, &mut io::sink())?;
        if !self.checked {
            // `read` returned 0 before: the check ran there.
            self.check()?;
        }
        Ok(self.read)
    }

    fn check(&mut self) -> io::Result<()> {
        self.checked = true;
        if let Some(s) = self.size {
            if self.read != s {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is {} bytes, its descriptor says {s}",
                        self.want, self.read
                    ),
                ));
            }
        }
        let got = Digest::from_sha256(&self.hasher.clone().finalize());
        if got != self.want {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "digest mismatch: expected {}, the bytes hash to {got}",
                    self.want
                ),
            ));
        }
        Ok(())
    }
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.checked {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.check()?;
            return Ok(0);
        }
        self.read += n as u64;
        let limit = self.size.unwrap_or(self.max);
        if self.read > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} runs past {limit} bytes", self.want),
            ));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Read a whole small document (manifest, index, config) and check it.
pub fn read_document<R: Read>(
    r: R,
    want: &Digest,
    size: Option<u64>,
    max: u64,
) -> io::Result<Vec<u8>> {
    let mut v = Verifying::new(r, want.clone(), size, max);
    let mut out = Vec::new();
    v.read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(b: &[u8]) -> Digest {
        Digest::from_sha256(&Sha256::digest(b))
    }

    #[test]
    fn the_right_bytes_pass_and_a_changed_byte_fails_at_the_end() {
        let data = b"layer bytes".to_vec();
        let d = digest_of(&data);
        assert_eq!(read_document(&data[..], &d, Some(11), 100).unwrap(), data);
        let mut bad = data.clone();
        bad[3] ^= 1;
        let e = read_document(&bad[..], &d, Some(11), 100).unwrap_err();
        assert!(e.to_string().contains("digest mismatch"), "{e}");
    }

    #[test]
    fn a_stream_longer_or_shorter_than_its_descriptor_is_refused() {
        let data = vec![7u8; 1000];
        let d = digest_of(&data);
        let e = read_document(&data[..], &d, Some(999), 10_000).unwrap_err();
        assert!(e.to_string().contains("runs past 999"), "{e}");
        let e = read_document(&data[..], &d, Some(1001), 10_000).unwrap_err();
        assert!(e.to_string().contains("its descriptor says 1001"), "{e}");
        let e = read_document(&data[..], &d, None, 500).unwrap_err();
        assert!(e.to_string().contains("runs past 500"), "{e}");
    }

    #[test]
    fn finish_reads_what_a_decompressor_left_behind() {
        let data = b"abcdef".to_vec();
        let mut v = Verifying::new(&data[..], digest_of(&data), Some(6), 6);
        let mut two = [0u8; 2];
        v.read_exact(&mut two).unwrap();
        assert_eq!(v.finish().unwrap(), 6);
    }
}
