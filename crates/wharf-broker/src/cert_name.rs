//! The common name (CN) in a client certificate's subject: the user name SASL `EXTERNAL` logs in
//! as, as RabbitMQ's `rabbitmq_auth_mechanism_ssl` takes it with `ssl_cert_login_from =
//! common_name`.
//!
//! A small DER walk rather than an X.509 crate: only the path certificate → tbsCertificate →
//! subject is needed, and the certificates it reads were already parsed and verified against the
//! configured CA by rustls (webpki) before the broker sees them, so a general parser (and the
//! dozen crates one brings) would buy nothing. It still trusts no length: every read is bounded
//! by the slice it comes from, and anything unexpected is `Malformed`, never a panic (a property
//! test feeds it arbitrary bytes).

/// Why a certificate gives no user name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameError {
    /// The bytes are not a certificate as X.509 lays it out.
    Malformed,
    /// The subject has no CN.
    Missing,
    /// The subject has several CNs: which one is the user is ambiguous, so none is (RabbitMQ
    /// refuses such a certificate too).
    Several,
    /// The CN is not text in an encoding read here (UTF8String, PrintableString, IA5String,
    /// TeletexString holding UTF-8, BMPString).
    NotText,
}

impl NameError {
    /// The reason, for the login refusal's text.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            NameError::Malformed => "the client certificate could not be read",
            NameError::Missing => "the client certificate's subject has no common name (CN)",
            NameError::Several => "the client certificate's subject has more than one common name (CN)",
            NameError::NotText => "the client certificate's common name (CN) is not text",
        }
    }
}

const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_INTEGER: u8 = 0x02;
const TAG_OID: u8 = 0x06;
/// `[0] EXPLICIT`: tbsCertificate's optional version.
const TAG_VERSION: u8 = 0xA0;
const TAG_UTF8_STRING: u8 = 0x0C;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_TELETEX_STRING: u8 = 0x14;
const TAG_IA5_STRING: u8 = 0x16;
const TAG_BMP_STRING: u8 = 0x1E;
/// The OID 2.5.4.3, id-at-commonName, as DER content bytes.
const OID_COMMON_NAME: [u8; 3] = [0x55, 0x04, 0x03];
/// Longest length field read: four bytes (4 GiB) is far beyond any certificate.
const LENGTH_BYTES_MAX: usize = 4;

/// One DER element: its tag and contents, and what follows it.
struct Element<'a> {
    tag: u8,
    contents: &'a [u8],
    rest: &'a [u8],
}

/// Reads one element from the front of `input`. Only single-byte tags occur on the path read here.
fn element(input: &[u8]) -> Result<Element<'_>, NameError> {
    let (&tag, after_tag) = input.split_first().ok_or(NameError::Malformed)?;
    if tag & 0x1F == 0x1F {
        return Err(NameError::Malformed);
    }
    let (&first, after_first) = after_tag.split_first().ok_or(NameError::Malformed)?;
    let (length, after_length) = if first < 0x80 {
        (usize::from(first), after_first)
    } else {
        let count = usize::from(first & 0x7F);
        if count == 0 || count > LENGTH_BYTES_MAX || after_first.len() < count {
            return Err(NameError::Malformed);
        }
        let (bytes, after) = after_first.split_at(count);
        let length = bytes.iter().fold(0usize, |length, byte| (length << 8) | usize::from(*byte));
        (length, after)
    };
    if after_length.len() < length {
        return Err(NameError::Malformed);
    }
    let (contents, rest) = after_length.split_at(length);
    Ok(Element { tag, contents, rest })
}

/// Reads an element that must carry `tag`.
fn expect(input: &[u8], tag: u8) -> Result<Element<'_>, NameError> {
    let read = element(input)?;
    if read.tag != tag {
        return Err(NameError::Malformed);
    }
    Ok(read)
}

/// The subject's common name in a DER certificate.
pub(crate) fn common_name(certificate_der: &[u8]) -> Result<String, NameError> {
    let certificate = expect(certificate_der, TAG_SEQUENCE)?;
    let tbs = expect(certificate.contents, TAG_SEQUENCE)?;
    let mut fields = tbs.contents;
    if fields.first() == Some(&TAG_VERSION) {
        fields = element(fields)?.rest;
    }
    let serial = expect(fields, TAG_INTEGER)?;
    let signature = expect(serial.rest, TAG_SEQUENCE)?;
    let issuer = expect(signature.rest, TAG_SEQUENCE)?;
    let validity = expect(issuer.rest, TAG_SEQUENCE)?;
    let subject = expect(validity.rest, TAG_SEQUENCE)?;
    let mut found = None;
    // Name ::= SEQUENCE OF RelativeDistinguishedName (a SET OF AttributeTypeAndValue).
    let mut names = subject.contents;
    while !names.is_empty() {
        let set = expect(names, TAG_SET)?;
        names = set.rest;
        let mut attributes = set.contents;
        while !attributes.is_empty() {
            let attribute = expect(attributes, TAG_SEQUENCE)?;
            attributes = attribute.rest;
            let kind = expect(attribute.contents, TAG_OID)?;
            if kind.contents != OID_COMMON_NAME {
                continue;
            }
            if found.is_some() {
                return Err(NameError::Several);
            }
            found = Some(element(kind.rest)?);
        }
    }
    let value = found.ok_or(NameError::Missing)?;
    text(value.tag, value.contents)
}

fn text(tag: u8, contents: &[u8]) -> Result<String, NameError> {
    match tag {
        TAG_UTF8_STRING | TAG_PRINTABLE_STRING | TAG_IA5_STRING | TAG_TELETEX_STRING => {
            String::from_utf8(contents.to_vec()).map_err(|_| NameError::NotText)
        }
        TAG_BMP_STRING => {
            if !contents.len().is_multiple_of(2) {
                return Err(NameError::NotText);
            }
            let units = contents.chunks_exact(2).map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
            char::decode_utf16(units).collect::<Result<String, _>>().map_err(|_| NameError::NotText)
        }
        _ => Err(NameError::NotText),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair};

    fn certificate(names: &[(DnType, DnValue)]) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        let mut subject = DistinguishedName::new();
        for (kind, value) in names {
            subject.push(kind.clone(), value.clone());
        }
        params.distinguished_name = subject;
        params.self_signed(&KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    #[test]
    fn the_common_name_is_read_in_each_text_encoding() {
        let utf8 = certificate(&[
            (DnType::OrganizationName, DnValue::Utf8String("Acme".into())),
            (DnType::CommonName, DnValue::Utf8String("orders-é".into())),
        ]);
        assert_eq!(common_name(&utf8), Ok("orders-é".into()));
        let printable = certificate(&[(DnType::CommonName, DnValue::PrintableString("billing".try_into().unwrap()))]);
        assert_eq!(common_name(&printable), Ok("billing".into()));
        let bmp = certificate(&[(DnType::CommonName, DnValue::BmpString("stock".try_into().unwrap()))]);
        assert_eq!(common_name(&bmp), Ok("stock".into()));
    }

    #[test]
    fn no_common_name_or_several_is_refused() {
        let none = certificate(&[(DnType::OrganizationName, DnValue::Utf8String("Acme".into()))]);
        assert_eq!(common_name(&none), Err(NameError::Missing));
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, "first");
        subject.push(DnType::OrganizationName, "Acme");
        params.distinguished_name = subject;
        let der = params.self_signed(&KeyPair::generate().unwrap()).unwrap().der().to_vec();
        assert_eq!(common_name(&der), Ok("first".into()));
        // rcgen keeps one value per attribute type, so the subject's O (the last "Acme": the
        // issuer comes first) is turned into a second CN by hand: 06 03 55 04 0A, 0C 04, "Acme".
        let organisation = der.windows(4).rposition(|window| window == b"Acme").unwrap();
        let mut twice = der.clone();
        assert_eq!(&twice[organisation - 5..organisation - 2], &[0x55, 0x04, 0x0A]);
        twice[organisation - 3] = OID_COMMON_NAME[2];
        assert_eq!(common_name(&twice), Err(NameError::Several));
    }

    #[test]
    fn truncated_certificates_are_malformed() {
        let der = certificate(&[(DnType::CommonName, DnValue::Utf8String("orders".into()))]);
        for length in 0..der.len() {
            assert_eq!(common_name(&der[..length]), Err(NameError::Malformed), "cut at {length}");
        }
        assert_eq!(common_name(&der), Ok("orders".into()));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = common_name(&bytes);
        }
    }
}
