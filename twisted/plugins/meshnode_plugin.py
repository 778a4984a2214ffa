from twisted.application.service import ServiceMaker

meshnode = ServiceMaker("meshnode", "meshnode.tap", "meshnode: reach LAN devices through a mesh of nodes", "meshnode")
