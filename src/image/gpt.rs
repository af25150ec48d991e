//! First-boot growth: when the disk is larger than the image (Exoscale enlarges template disks,
//! `dd` onto a bigger disk), move the backup GPT to the disk's end and stretch the `state`
//! partition (the last one) to fill it; the ext4 inside is then grown online.
//!
//! [`grow`] is pure: it takes the primary header and entry array, returns the new primary and
//! backup headers and entries, or `None` when there is nothing to grow. [`grow_disk`] does the
//! I/O (write backup first, primary last; tell the kernel with BLKPG; resize ext4 by ioctl).

use std::io::{Seek as _, SeekFrom, Write as _};
use std::os::fd::AsRawFd as _;

const SECTOR: u64 = 512;
/// Partitions end on 1 MiB boundaries.
const ALIGN: u64 = 2048;

/// The new GPT after growing: write `entries` at `entries_lba` and `backup_entries_lba`, the
/// headers at LBA 1 and `backup_lba`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grown {
    pub primary: Vec<u8>,
    pub backup: Vec<u8>,
    pub entries: Vec<u8>,
    pub entries_lba: u64,
    pub backup_entries_lba: u64,
    pub backup_lba: u64,
    /// Index of the grown partition (0-based) and its new first/last LBA.
    pub index: usize,
    pub first_lba: u64,
    pub old_last_lba: u64,
    pub new_last_lba: u64,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

fn header_crc(h: &[u8]) -> u32 {
    let size = u32_at(h, 12) as usize;
    let mut c = h[..size].to_vec();
    put_u32(&mut c, 16, 0);
    crc32fast::hash(&c)
}

/// The UTF-16LE partition name of entry `e`.
pub fn entry_name(e: &[u8]) -> String {
    let units: Vec<u16> = e[56..128]
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// The most entry-array bytes a header may claim: 128 KiB is eight times what every tool
/// writes (128 entries of 128 bytes). The array is allocated from these fields, so they are
/// bounded before anything is read or allocated.
pub const ENTRIES_MAX: usize = 128 * 1024;

/// Where a header's entry array is and how big it is, after checking the header alone:
/// signature, size, header CRC, and an entry geometry that every decoder below can trust
/// (entries of 128..=1024 bytes, a multiple of 8; at most [`ENTRIES_MAX`] bytes in all; the
/// array after LBA 1).
pub fn entries_extent(header: &[u8]) -> Result<(u64, usize), String> {
    if header.len() < 92 || &header[0..8] != b"EFI PART" {
        return Err("no GPT header at LBA 1".into());
    }
    let size = u32_at(header, 12) as usize;
    if !(92..=512).contains(&size)
        || size > header.len()
        || header_crc(header) != u32_at(header, 16)
    {
        return Err("GPT header CRC mismatch".into());
    }
    let count = u32_at(header, 80) as usize;
    let esize = u32_at(header, 84) as usize;
    if !(128..=1024).contains(&esize) || !esize.is_multiple_of(8) {
        return Err(format!(
            "GPT header: partition entries of {esize} bytes (128 to 1024, a multiple of 8)"
        ));
    }
    match count.checked_mul(esize) {
        Some(n) if n <= ENTRIES_MAX => {}
        _ => {
            return Err(format!(
                "GPT header: {count} partition entries of {esize} bytes is more than {ENTRIES_MAX} bytes"
            ))
        }
    }
    let lba = u64_at(header, 72);
    if lba < 2 {
        return Err(format!(
            "GPT header: partition entries at LBA {lba}, inside the header"
        ));
    }
    Ok((lba, count * esize))
}

/// Check a primary header and its entries: signature, header CRC, geometry, entries CRC.
pub fn check(header: &[u8], entries: &[u8]) -> Result<(), String> {
    let (_, n) = entries_extent(header)?;
    if entries.len() < n || crc32fast::hash(&entries[..n]) != u32_at(header, 88) {
        return Err("GPT partition entries CRC mismatch".into());
    }
    Ok(())
}

/// Read the primary GPT (header at LBA 1, then its entry array) from `disk`, checking the
/// header before the entry array is allocated from its fields.
pub fn read<D: std::io::Read + std::io::Seek>(disk: &mut D) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut header = vec![0u8; SECTOR as usize];
    disk.seek(SeekFrom::Start(SECTOR))
        .and_then(|_| disk.read_exact(&mut header))
        .map_err(|e| format!("reading the GPT header: {e}"))?;
    let (lba, n) = entries_extent(&header)?;
    let at = lba
        .checked_mul(SECTOR)
        .ok_or_else(|| format!("GPT header: partition entries at LBA {lba}, past any disk"))?;
    let mut entries = vec![0u8; n];
    disk.seek(SeekFrom::Start(at))
        .and_then(|_| disk.read_exact(&mut entries))
        .map_err(|e| format!("reading the GPT partition entries at LBA {lba}: {e}"))?;
    check(&header, &entries)?;
    Ok((header, entries))
}

/// Grow partition `name` (which must be the last on the disk) to the end of a disk of
/// `disk_sectors`, moving the backup GPT there. None when the disk has not grown by at least
/// one alignment unit.
pub fn grow(
    header: &[u8],
    entries: &[u8],
    disk_sectors: u64,
    name: &str,
) -> Result<Option<Grown>, String> {
    check(header, entries)?;
    let count = u32_at(header, 80) as usize;
    let esize = u32_at(header, 84) as usize;
    let entries = entries[..count * esize].to_vec();
    let entry_sectors = ((count * esize) as u64).div_ceil(SECTOR);
    let too_small = || format!("a disk of {disk_sectors} sectors cannot hold this GPT");
    let backup_lba = disk_sectors.checked_sub(1).ok_or_else(too_small)?;
    let backup_entries_lba = backup_lba
        .checked_sub(entry_sectors)
        .ok_or_else(too_small)?;
    let last_usable = backup_entries_lba.checked_sub(1).ok_or_else(too_small)?;
    let mut found = None;
    let mut max_end = 0;
    for i in 0..count {
        let e = &entries[i * esize..(i + 1) * esize];
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let last = u64_at(e, 40);
        max_end = max_end.max(last);
        if entry_name(e) == name {
            found = Some((i, u64_at(e, 32), last));
        }
    }
    let (index, first, old_last) = found.ok_or_else(|| format!("no partition named {name:?}"))?;
    if old_last != max_end {
        return Err(format!(
            "partition {name:?} is not the last one on the disk"
        ));
    }
    if first > old_last {
        return Err(format!("partition {name:?} ends before it starts"));
    }
    let Some(new_last) = ((last_usable + 1) / ALIGN * ALIGN).checked_sub(1) else {
        return Ok(None);
    };
    if new_last < old_last.saturating_add(ALIGN) || last_usable <= u64_at(header, 48) {
        return Ok(None);
    }
    let mut entries = entries;
    put_u64(&mut entries[index * esize..], 40, new_last);
    let mut primary = header[..u32_at(header, 12) as usize].to_vec();
    put_u64(&mut primary, 32, backup_lba);
    put_u64(&mut primary, 48, last_usable);
    put_u32(&mut primary, 88, crc32fast::hash(&entries));
    let mut backup = primary.clone();
    put_u64(&mut backup, 24, backup_lba);
    put_u64(&mut backup, 32, 1);
    put_u64(&mut backup, 72, backup_entries_lba);
    let crc = header_crc(&primary);
    put_u32(&mut primary, 16, crc);
    let crc = header_crc(&backup);
    put_u32(&mut backup, 16, crc);
    Ok(Some(Grown {
        primary,
        backup,
        entries,
        entries_lba: u64_at(header, 72),
        backup_entries_lba,
        backup_lba,
        index,
        first_lba: first,
        old_last_lba: old_last,
        new_last_lba: new_last,
    }))
}

fn write_at(f: &mut std::fs::File, lba: u64, data: &[u8]) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(lba * SECTOR))?;
    // Whole sectors: pad a 92-byte header with zeros.
    let mut buf = data.to_vec();
    buf.resize(data.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
    f.write_all(&buf)
}

// linux/blkpg.h
const BLKPG: libc::c_ulong = 0x1269;
const BLKPG_RESIZE_PARTITION: libc::c_int = 3;
#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [libc::c_char; 64],
    volname: [libc::c_char; 64],
}
#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}
/// _IOW('f', 16, __u64)
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Grow `name` on `disk` (e.g. /dev/vda) to the disk's end, and the ext4 mounted at
/// `mountpoint` with it. Returns the old and new sizes in bytes, or None when not needed.
pub fn grow_disk(disk: &str, name: &str, mountpoint: &str) -> Result<Option<(u64, u64)>, String> {
    let devname = disk.rsplit('/').next().unwrap_or(disk);
    let sectors: u64 = std::fs::read_to_string(format!("/sys/class/block/{devname}/size"))
        .map_err(|e| format!("{disk} size: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{disk} size: {e}"))?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(|e| format!("{disk}: {e}"))?;
    let (header, entries) = read(&mut f).map_err(|e| format!("{disk}: {e}"))?;
    let Some(g) = grow(&header, &entries, sectors, name).map_err(|e| format!("{disk}: {e}"))?
    else {
        return Ok(None);
    };
    let io = |e: std::io::Error| format!("{disk}: writing the GPT: {e}");
    write_at(&mut f, g.backup_entries_lba, &g.entries).map_err(io)?;
    write_at(&mut f, g.backup_lba, &g.backup).map_err(io)?;
    write_at(&mut f, g.entries_lba, &g.entries).map_err(io)?;
    write_at(&mut f, 1, &g.primary).map_err(io)?;
    f.sync_all().map_err(io)?;
    let mut part = BlkpgPartition {
        start: (g.first_lba * SECTOR) as i64,
        length: ((g.new_last_lba - g.first_lba + 1) * SECTOR) as i64,
        pno: g.index as i32 + 1,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as i32,
        data: (&mut part as *mut BlkpgPartition).cast(),
    };
    // SAFETY: arg points at a live blkpg_partition for the call's duration.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKPG, &mut arg) } < 0 {
        return Err(format!(
            "{disk}: the kernel refused the new partition size: {}",
            std::io::Error::last_os_error()
        ));
    }
    let old = (g.old_last_lba - g.first_lba + 1) * SECTOR;
    let new = part.length as u64;
    let mnt = std::fs::File::open(mountpoint).map_err(|e| format!("{mountpoint}: {e}"))?;
    // SAFETY: statvfs into a zeroed struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out pointer.
    if unsafe { libc::fstatvfs(mnt.as_raw_fd(), &mut st) } < 0 {
        return Err(format!(
            "{mountpoint}: statvfs: {}",
            std::io::Error::last_os_error()
        ));
    }
    let blocks: u64 = new / st.f_bsize;
    // SAFETY: the ioctl reads one u64.
    if unsafe { libc::ioctl(mnt.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks) } < 0 {
        return Err(format!(
            "{mountpoint}: growing ext4 to {blocks} blocks: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(Some((old, new)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64 MiB disk's GPT with two partitions, the second named "state" and last.
    fn gpt(disk_sectors: u64) -> (Vec<u8>, Vec<u8>) {
        let mut entries = vec![0u8; 128 * 128];
        for (i, (first, last, name)) in [(2048u64, 4095u64, "esp"), (4096, 8191, "state")]
            .iter()
            .enumerate()
        {
            let e = &mut entries[i * 128..(i + 1) * 128];
            e[0] = 0xaf; // a type GUID that is not all zeros
            e[16] = i as u8 + 1;
            put_u64(e, 32, *first);
            put_u64(e, 40, *last);
            for (k, u) in name.encode_utf16().enumerate() {
                e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
            }
        }
        let mut h = vec![0u8; 92];
        h[0..8].copy_from_slice(b"EFI PART");
        put_u32(&mut h, 8, 0x0001_0000);
        put_u32(&mut h, 12, 92);
        put_u64(&mut h, 24, 1);
        put_u64(&mut h, 32, disk_sectors - 1);
        put_u64(&mut h, 40, 34);
        put_u64(&mut h, 48, disk_sectors - 34);
        put_u64(&mut h, 72, 2);
        put_u32(&mut h, 80, 128);
        put_u32(&mut h, 84, 128);
        put_u32(&mut h, 88, crc32fast::hash(&entries));
        let crc = header_crc(&h);
        put_u32(&mut h, 16, crc);
        (h, entries)
    }

    #[test]
    fn a_larger_disk_grows_the_last_partition_and_moves_the_backup_gpt() {
        let (h, e) = gpt(10240);
        let g = grow(&h, &e, 1 << 21, "state").unwrap().unwrap();
        assert_eq!(g.backup_lba, (1 << 21) - 1);
        assert_eq!(g.backup_entries_lba, (1 << 21) - 33);
        assert_eq!(g.new_last_lba, (1 << 21) - 2048 - 1);
        assert_eq!((g.new_last_lba + 1) % 2048, 0);
        check(&g.primary, &g.entries).unwrap();
        check(&g.backup, &g.entries).unwrap();
        assert_eq!(u64_at(&g.backup, 24), g.backup_lba);
        assert_eq!(u64_at(&g.backup, 32), 1);
        assert_eq!(u64_at(&g.primary, 32), g.backup_lba);
        assert_eq!(u64_at(&g.entries[128..], 40), g.new_last_lba);
    }

    #[test]
    fn a_disk_of_the_image_size_needs_nothing() {
        let (h, e) = gpt(10240);
        assert_eq!(grow(&h, &e, 10240, "state").unwrap(), None);
        let (g, e2) = {
            let g = grow(&h, &e, 1 << 21, "state").unwrap().unwrap();
            (g.primary.clone(), g.entries)
        };
        assert_eq!(
            grow(&g, &e2, 1 << 21, "state").unwrap(),
            None,
            "growing twice is a no-op"
        );
    }

    #[test]
    fn only_the_last_partition_may_grow_and_damage_is_refused() {
        let (h, e) = gpt(10240);
        assert!(grow(&h, &e, 1 << 21, "esp")
            .unwrap_err()
            .contains("not the last"));
        assert!(grow(&h, &e, 1 << 21, "nope")
            .unwrap_err()
            .contains("no partition"));
        let mut bad = e.clone();
        bad[200] ^= 1;
        assert!(grow(&h, &bad, 1 << 21, "state")
            .unwrap_err()
            .contains("entries CRC"));
        let mut badh = h.clone();
        badh[40] ^= 1;
        assert!(grow(&badh, &e, 1 << 21, "state")
            .unwrap_err()
            .contains("header CRC"));
    }
    /// The header's entry count and size decide how much is allocated: a header that passes
    /// its own CRC but claims 4 G entries of 4 GiB is refused before anything is allocated
    /// (before, the product overflowed, or wrapped to an allocation of up to 16 EiB).
    #[test]
    fn a_header_claiming_a_huge_entry_array_is_refused_before_allocating() {
        let (mut h, e) = gpt(10240);
        put_u32(&mut h, 80, u32::MAX);
        put_u32(&mut h, 84, u32::MAX);
        let crc = header_crc(&h);
        put_u32(&mut h, 16, crc);
        let mut disk = vec![0u8; 10240 * 512];
        disk[512..512 + 92].copy_from_slice(&h);
        disk[1024..1024 + e.len()].copy_from_slice(&e);
        let err = read(&mut std::io::Cursor::new(&disk)).unwrap_err();
        assert!(
            err.contains("partition entries of 4294967295 bytes"),
            "{err}"
        );
        put_u32(&mut h, 84, 128);
        let crc = header_crc(&h);
        put_u32(&mut h, 16, crc);
        disk[512..512 + 92].copy_from_slice(&h);
        let err = read(&mut std::io::Cursor::new(&disk)).unwrap_err();
        assert!(err.contains("more than 131072 bytes"), "{err}");
        // The same disk with its own header reads back whole.
        let (h, e) = gpt(10240);
        disk[512..512 + 92].copy_from_slice(&h);
        let (rh, re) = read(&mut std::io::Cursor::new(&disk)).unwrap();
        assert_eq!((&rh[..92], re), (&h[..], e));
    }

    /// Fields no tool writes (tiny entries, a disk smaller than the GPT, a partition ending
    /// before it starts) are errors, not panics in PID 1.
    #[test]
    fn nonsense_geometry_is_an_error_not_a_panic() {
        let (h, e) = gpt(10240);
        assert!(grow(&h, &e, 0, "state")
            .unwrap_err()
            .contains("cannot hold"));
        assert!(grow(&h, &e, 20, "state")
            .unwrap_err()
            .contains("cannot hold"));
        assert_eq!(grow(&h, &e, 40, "state"), Ok(None));
        let mut small = h.clone();
        put_u32(&mut small, 84, 16);
        let crc = header_crc(&small);
        put_u32(&mut small, 16, crc);
        assert!(grow(&small, &e, 1 << 21, "state")
            .unwrap_err()
            .contains("entries of 16 bytes"));
        let mut backwards = e.clone();
        put_u64(&mut backwards[128..], 32, 9000);
        let mut hb = h.clone();
        put_u32(&mut hb, 88, crc32fast::hash(&backwards));
        let crc = header_crc(&hb);
        put_u32(&mut hb, 16, crc);
        assert!(grow(&hb, &backwards, 1 << 21, "state")
            .unwrap_err()
            .contains("ends before"));
    }
}
