use super::*;

const QEMU_FLAT: &str = r#"# Disk DescriptorFile
version=1
CID=52b4a1c2
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
RW 8192 FLAT "d-flat.vmdk" 0

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.geometry.cylinders = "8"
ddb.adapterType = "ide"
"#;

#[test]
fn descriptors_as_qemu_and_vmware_write_them() {
    assert_eq!(
        parse_descriptor(QEMU_FLAT.as_bytes()).unwrap(),
        [ExtentLine {
            access: Access::ReadWrite,
            sectors: 8192,
            file: Some("d-flat.vmdk".into()),
            offset_sectors: 0,
        }]
    );
    // Several extents, a file name with spaces, an offset, ZERO, RDONLY and NOACCESS.
    let text = "# Disk DescriptorFile\ncreateType=\"twoGbMaxExtentFlat\"\n\
                RW 4194304 FLAT \"my disk-f001.vmdk\" 0\n\
                RDONLY 2048 VMFS \"other.vmdk\" 16\nRW 100 ZERO\nNOACCESS 8 FLAT \"x\"\n";
    let e = parse_descriptor(text.as_bytes()).unwrap();
    assert_eq!(e.len(), 4);
    assert_eq!(e[0].file.as_deref(), Some("my disk-f001.vmdk"));
    assert_eq!((e[1].access, e[1].offset_sectors), (Access::ReadOnly, 16));
    assert_eq!((e[2].file.as_ref(), e[2].sectors), (None, 100));
    assert_eq!(e[3].access, Access::NoAccess);
}

#[test]
fn what_is_not_a_flat_vmdk_is_refused_by_name() {
    let head = "# Disk DescriptorFile\n";
    for (body, why) in [
        (
            "createType=\"monolithicSparse\"\nRW 8 SPARSE \"a.vmdk\"\n",
            "monolithicSparse",
        ),
        ("RW 8 SPARSE \"a.vmdk\"\n", "SPARSE extents"),
        ("RW 8 SESPARSE \"a.vmdk\"\n", "SESPARSE extents"),
        ("parentCID=12345678\nRW 8 FLAT \"a\"\n", "differencing"),
        ("version=1\n", "no extent"),
        ("RW 8 FLAT\n", "extent line"),
        ("RW x FLAT \"a\"\n", "extent line"),
        ("RW 8 FLAT \"a\" 1 2\n", "extent line"),
        ("RW 8 FLAT \"\"\n", "extent line"),
        ("RW 8 FLAT \"a\n", "extent line"),
        ("WO 8 FLAT \"a\"\n", "extent line"),
        ("RW 8 ZERO \"a\"\n", "extent line"),
        (
            "RW 18446744073709551615 FLAT \"a\"\nRW 1 FLAT \"b\"\n",
            "past 2^64",
        ),
    ] {
        let e = parse_descriptor(format!("{head}{body}").as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{body:?}: {e}");
    }
    assert!(parse_descriptor(b"KDMV\x01\0\0\0").is_err());
    // Zero padding ends the text.
    let padded = [QEMU_FLAT.as_bytes(), &[0u8; 300], b"RW 8 SPARSE \"x\"\n"].concat();
    assert_eq!(parse_descriptor(&padded).unwrap().len(), 1);
    assert!(parse_descriptor(b"# Disk DescriptorFile\n\xff\xfe").is_err());
    let many = "RW 1 ZERO\n".repeat(MAX_EXTENTS + 1);
    let e = parse_descriptor(format!("{head}{many}").as_bytes()).unwrap_err();
    assert!(e.to_string().contains("more than"), "{e}");
}

#[test]
fn extent_files_stay_in_the_descriptors_folder() {
    let dir = Path::new("/images");
    assert_eq!(inside(dir, "d-flat.vmdk").unwrap(), dir.join("d-flat.vmdk"));
    assert_eq!(inside(dir, "sub/d.vmdk").unwrap(), dir.join("sub/d.vmdk"));
    for bad in ["/etc/shadow", "../other.img", "sub/../../x", "./d.vmdk", ""] {
        assert!(inside(dir, bad).is_err(), "{bad}");
    }
}
