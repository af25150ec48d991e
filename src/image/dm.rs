//! dm-verity without veritysetup: read the verity superblock of a hash partition, build the
//! kernel's `verity` table line, and create the mapping with three device-mapper ioctls
//! (DEV_CREATE, TABLE_LOAD, DEV_SUSPEND to resume).
//!
//! The superblock is not authenticated, and need not be: its salt, block sizes and block count
//! all feed the hash tree, so any change to them changes the root hash, which comes from the
//! kernel command line (inside the signed-able unified kernel image).

use std::os::fd::AsRawFd as _;

/// What the verity superblock (cryptsetup's on-disk format, version 1) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub hash_type: u32,
    pub algorithm: String,
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
    pub salt: Vec<u8>,
}

/// The largest data device a superblock may describe.
const MAX_DATA_BYTES: u64 = 1 << 50;

/// Parse the first 512 bytes of a verity hash device.
pub fn parse_superblock(b: &[u8]) -> Result<Superblock, String> {
    if b.len() < 512 {
        return Err(format!("verity superblock truncated ({} bytes)", b.len()));
    }
    if &b[0..8] != b"verity\0\0" {
        return Err("no verity superblock (signature \"verity\" missing)".into());
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version != 1 {
        return Err(format!("verity superblock version {version}, expected 1"));
    }
    let algorithm: String = b[32..64]
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as char)
        .collect();
    if algorithm.is_empty() || !algorithm.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "verity superblock names a bad algorithm {algorithm:?}"
        ));
    }
    let data_block_size = u32_at(64);
    let hash_block_size = u32_at(68);
    for (what, s) in [("data", data_block_size), ("hash", hash_block_size)] {
        if !(512..=65536).contains(&s) || !s.is_power_of_two() {
            return Err(format!(
                "verity {what} block size {s} is not a power of two in 512..65536"
            ));
        }
    }
    let data_blocks = u64::from_le_bytes(b[72..80].try_into().expect("8 bytes"));
    // The table's length is data_blocks × block size in sectors: a count that does not fit a
    // disk (here: 1 PiB) is refused rather than overflowing into a short mapping.
    if data_blocks == 0
        || data_blocks
            .checked_mul(u64::from(data_block_size))
            .is_none_or(|n| n > MAX_DATA_BYTES)
    {
        return Err(format!(
            "verity superblock: {data_blocks} data blocks of {data_block_size} bytes is no disk"
        ));
    }
    let salt_size = u16::from_le_bytes([b[80], b[81]]) as usize;
    if salt_size > 256 {
        return Err(format!("verity salt of {salt_size} bytes (at most 256)"));
    }
    Ok(Superblock {
        hash_type: u32_at(12),
        algorithm,
        data_block_size,
        hash_block_size,
        data_blocks,
        salt: b[88..88 + salt_size].to_vec(),
    })
}

/// A root hash as the kernel command line carries it: lower-case hex, 32 bytes for sha256.
pub fn check_root_hash(h: &str) -> Result<(), String> {
    if h.len() != 64 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "appliance.verity={h:?} is not a 64-digit hex sha256 root hash"
        ));
    }
    Ok(())
}

/// The dm table line for a verity target: `(length in 512-byte sectors, parameters)`.
/// The hash tree starts one hash block into the hash device, after the superblock.
pub fn verity_table(
    sb: &Superblock,
    data_dev: &str,
    hash_dev: &str,
    root_hash: &str,
) -> (u64, String) {
    let sectors = sb.data_blocks * u64::from(sb.data_block_size) / 512;
    let salt = if sb.salt.is_empty() {
        "-".to_string()
    } else {
        crate::image::userdata::hex(&sb.salt)
    };
    let params = format!(
        "{} {data_dev} {hash_dev} {} {} {} 1 {} {root_hash} {salt}",
        sb.hash_type, sb.data_block_size, sb.hash_block_size, sb.data_blocks, sb.algorithm
    );
    (sectors, params)
}

// linux/dm-ioctl.h
const DM_IOCTL_SIZE: usize = 312;
const DM_NAME_OFFSET: usize = 48;
const DM_TARGET_SPEC_SIZE: usize = 40;
const DM_READONLY_FLAG: u32 = 1;
const fn dm_iowr(nr: u64) -> u64 {
    (3 << 30) | ((DM_IOCTL_SIZE as u64) << 16) | (0xfd << 8) | nr
}
const DM_DEV_CREATE: u64 = dm_iowr(3);
const DM_DEV_REMOVE: u64 = dm_iowr(4);
const DM_DEV_SUSPEND: u64 = dm_iowr(6);
const DM_TABLE_LOAD: u64 = dm_iowr(9);

/// A `struct dm_ioctl` header (version 4.0.0) for device `name`, followed by `payload`.
fn dm_buffer(name: &str, flags: u32, target_count: u32, payload: &[u8]) -> Vec<u8> {
    let size = (DM_IOCTL_SIZE + payload.len() + 16 * 1024).next_multiple_of(8);
    let mut b = vec![0u8; size];
    b[0..4].copy_from_slice(&4u32.to_ne_bytes());
    b[12..16].copy_from_slice(&(size as u32).to_ne_bytes());
    b[16..20].copy_from_slice(&(DM_IOCTL_SIZE as u32).to_ne_bytes());
    b[20..24].copy_from_slice(&target_count.to_ne_bytes());
    b[28..32].copy_from_slice(&flags.to_ne_bytes());
    b[DM_NAME_OFFSET..DM_NAME_OFFSET + name.len()].copy_from_slice(name.as_bytes());
    b[DM_IOCTL_SIZE..DM_IOCTL_SIZE + payload.len()].copy_from_slice(payload);
    b
}

/// One `struct dm_target_spec` plus its NUL-terminated parameters, padded to 8 bytes.
fn target_spec(sectors: u64, kind: &str, params: &str) -> Vec<u8> {
    let len = (DM_TARGET_SPEC_SIZE + params.len() + 1).next_multiple_of(8);
    let mut b = vec![0u8; len];
    b[8..16].copy_from_slice(&sectors.to_ne_bytes());
    b[20..24].copy_from_slice(&(len as u32).to_ne_bytes());
    b[24..24 + kind.len()].copy_from_slice(kind.as_bytes());
    b[DM_TARGET_SPEC_SIZE..DM_TARGET_SPEC_SIZE + params.len()].copy_from_slice(params.as_bytes());
    b
}

fn dm_ioctl(ctl: &std::fs::File, req: u64, buf: &mut [u8], what: &str) -> Result<(), String> {
    // SAFETY: buf is a dm_ioctl header followed by its payload, data_size says how long.
    let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), req as libc::c_ulong, buf.as_mut_ptr()) };
    if rc < 0 {
        return Err(format!(
            "device-mapper {what}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Create a read-only verity mapping called `name`; returns its device node (`/dev/dm-N`).
pub fn create_verity(name: &str, sectors: u64, params: &str) -> Result<String, String> {
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .map_err(|e| format!("cannot open /dev/mapper/control: {e}"))?;
    let mut create = dm_buffer(name, 0, 0, &[]);
    dm_ioctl(&ctl, DM_DEV_CREATE, &mut create, "create")?;
    let dev = u64::from_ne_bytes(create[40..48].try_into().expect("8 bytes"));
    let mut load = dm_buffer(
        name,
        DM_READONLY_FLAG,
        1,
        &target_spec(sectors, "verity", params),
    );
    dm_ioctl(&ctl, DM_TABLE_LOAD, &mut load, "table load (verity)")?;
    let mut resume = dm_buffer(name, 0, 0, &[]);
    dm_ioctl(&ctl, DM_DEV_SUSPEND, &mut resume, "resume")?;
    Ok(format!("/dev/dm-{}", libc::minor(dev as libc::dev_t)))
}

/// Remove the mapping called `name`.
pub fn remove(name: &str) -> Result<(), String> {
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .map_err(|e| format!("cannot open /dev/mapper/control: {e}"))?;
    let mut buf = dm_buffer(name, 0, 0, &[]);
    dm_ioctl(&ctl, DM_DEV_REMOVE, &mut buf, "remove")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..8].copy_from_slice(b"verity\0\0");
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[32..38].copy_from_slice(b"sha256");
        b[64..68].copy_from_slice(&4096u32.to_le_bytes());
        b[68..72].copy_from_slice(&4096u32.to_le_bytes());
        b[72..80].copy_from_slice(&1234u64.to_le_bytes());
        b[80..82].copy_from_slice(&4u16.to_le_bytes());
        b[88..92].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        b
    }

    /// Found by the verity_superblock fuzz target: a block count whose size in sectors
    /// overflowed (a panic in stage 1's debug build, a short mapping in release).
    #[test]
    fn a_block_count_no_disk_can_hold_is_refused() {
        for blocks in [0u64, u64::MAX, (1 << 50) / 4096 + 1] {
            let mut b = superblock();
            b[72..80].copy_from_slice(&blocks.to_le_bytes());
            let e = parse_superblock(&b).unwrap_err();
            assert!(e.contains("is no disk"), "{blocks}: {e}");
        }
        let mut b = superblock();
        b[72..80].copy_from_slice(&((1u64 << 50) / 4096).to_le_bytes());
        let sb = parse_superblock(&b).unwrap();
        assert_eq!(verity_table(&sb, "1:1", "1:2", "ab").0, (1 << 50) / 512);
    }

    #[test]
    fn a_veritysetup_superblock_gives_the_kernel_table_line() {
        let sb = parse_superblock(&superblock()).unwrap();
        let root = "ab".repeat(32);
        let (sectors, params) = verity_table(&sb, "253:1", "253:2", &root);
        assert_eq!(sectors, 1234 * 8);
        assert_eq!(
            params,
            format!("1 253:1 253:2 4096 4096 1234 1 sha256 {root} deadbeef")
        );
    }

    #[test]
    fn a_partition_without_a_verity_superblock_is_refused() {
        let mut b = superblock();
        b[0] = b'x';
        assert!(parse_superblock(&b).unwrap_err().contains("signature"));
        let mut b = superblock();
        b[64..68].copy_from_slice(&3000u32.to_le_bytes());
        assert!(parse_superblock(&b).unwrap_err().contains("power of two"));
        assert!(parse_superblock(&b[..100])
            .unwrap_err()
            .contains("truncated"));
    }

    #[test]
    fn root_hashes_must_be_64_hex_digits() {
        assert!(check_root_hash(&"0f".repeat(32)).is_ok());
        assert!(check_root_hash("abc").is_err());
        assert!(check_root_hash(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn dm_ioctl_numbers_match_the_kernel_header() {
        // _IOWR(0xfd, 3, struct dm_ioctl) with sizeof(struct dm_ioctl) == 312.
        assert_eq!(DM_DEV_CREATE, 0xc138_fd03);
        assert_eq!(DM_TABLE_LOAD, 0xc138_fd09);
        assert_eq!(DM_DEV_SUSPEND, 0xc138_fd06);
    }

    #[test]
    fn target_specs_are_padded_to_eight_bytes_and_point_past_themselves() {
        let t = target_spec(8, "verity", "abc");
        assert_eq!(t.len() % 8, 0);
        assert_eq!(
            u32::from_ne_bytes(t[20..24].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(&t[40..44], b"abc\0");
    }
}
