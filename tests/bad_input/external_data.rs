//! External data.

use super::*;

#[test]
fn case_external_data_missing_or_short() {
    let d = tempdir();
    let p = d.path().join("dynamo_ext.onnx");
    std::fs::copy(fixture("conv2", "dynamo_ext.onnx"), &p).unwrap();
    refused(&p, &["external data", "dynamo_ext.onnx.data"]);
    // shorter than declared
    let data = std::fs::read(fixture("conv2", "dynamo_ext.onnx.data")).unwrap();
    std::fs::write(d.path().join("dynamo_ext.onnx.data"), &data[..data.len() - 1]).unwrap();
    refused(&p, &["external data", "shorter than declared"]);
    // a folder where the data file should be
    std::fs::remove_file(d.path().join("dynamo_ext.onnx.data")).unwrap();
    std::fs::create_dir(d.path().join("dynamo_ext.onnx.data")).unwrap();
    refused(&p, &["external data", "folder"]);
}

/// A location that is absolute or climbs out of the model's folder is refused as unsafe, even
/// when the file it names exists and holds the right bytes.
#[test]
fn case_external_location_escaping_the_folder() {
    let d = tempdir();
    let sub = d.path().join("models");
    std::fs::create_dir(&sub).unwrap();
    let data = fixture("conv2", "dynamo_ext.onnx.data");
    std::fs::copy(&data, d.path().join("weights.data")).unwrap();
    let abs = d.path().join("weights.data").to_string_lossy().into_owned();
    for (name, loc) in [
        ("abs.onnx", abs.as_str()),
        ("abs_fixture.onnx", data.to_str().unwrap()),
        ("dotdot.onnx", "../weights.data"),
        ("inner_dotdot.onnx", "x/../../weights.data"),
        ("etc.onnx", "/etc/passwd"),
        ("empty_loc.onnx", ""),
    ] {
        let mut m = read(&fixture("conv2", "dynamo_ext.onnx"));
        for t in graph(&mut m).initializer.iter_mut() {
            for e in t.external_data.iter_mut().filter(|e| e.key() == "location") {
                e.value = Some(loc.to_string());
            }
        }
        let p = sub.join(name);
        write(&m, &p);
        refused(&p, &["unsafe"]);
    }
}

/// External data behind a link to a file outside the model's folder is refused in every
/// command, as onnx does since CVE-2024-27318 (the link's target is read nowhere).
#[cfg(unix)]
#[test]
fn case_external_data_linked_outside_the_folder_is_refused() {
    let d = tempdir();
    let (inside, outside) = (d.path().join("model"), d.path().join("elsewhere"));
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    // the same bytes as the real data file, so only the link's place is wrong
    let secret = outside.join("secret.bin");
    std::fs::copy(fixture("conv2", "dynamo_ext.onnx.data"), &secret).unwrap();
    let p = inside.join("dynamo_ext.onnx");
    std::fs::copy(fixture("conv2", "dynamo_ext.onnx"), &p).unwrap();
    std::os::unix::fs::symlink(&secret, inside.join("dynamo_ext.onnx.data")).unwrap();
    refused(&p, &["resolves outside the model's folder", "unsafe"]);
    // a link that stays inside the folder is fine
    std::fs::remove_file(inside.join("dynamo_ext.onnx.data")).unwrap();
    std::fs::copy(&secret, inside.join("real.data")).unwrap();
    std::os::unix::fs::symlink("real.data", inside.join("dynamo_ext.onnx.data")).unwrap();
    assert!(Model::load(&p).is_ok());
}
